"""Text in, text out: the batch API for offline jobs.

    with flexgen.LLM("/models/opt-6.7b", gpu_mem=16) as llm:
        outs = llm.generate(["Paris is", "The quick brown fox"],
                            flexgen.SamplingParams(max_new_tokens=32, stop=["\\n"]))
        print(outs[0].text, outs[0].finish_reason)

Prompts of any number and lengths are grouped by length into blocks of
gpu_batch_size x num_gpu_batches (little padding), run through the engine block by block,
and returned in input order.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from flexgen.errors import FlexGenError
from flexgen.policy import Policy
from flexgen.sampling import REASON_NAMES, LogprobRecorder, RowSampler, StopCriteria


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. temperature 0 is greedy.

    stop: strings that end the text (matched on the decoded text, also across tokens; the
    text is cut before it). stop_token_ids: tokens that end it (kept in token_ids).
    logprobs: None, or k >= 0: the log-probability of each generated token plus its k most
    likely alternatives. prompt_logprobs: log P(token | prefix) for each prompt token
    after the first. echo: the returned text starts with the prompt. ignore_eos: do not
    stop at the model's EOS token. seed: this prompt's own random stream, reproducible
    whatever block it lands in. max_new_tokens 0 only scores the prompt.
    """
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Optional[tuple] = None
    stop_token_ids: Optional[tuple] = None
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    prompt_logprobs: bool = False
    echo: bool = False
    ignore_eos: bool = False

    def __post_init__(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise FlexGenError(msg)

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        check(is_int(self.max_new_tokens) and self.max_new_tokens >= 0,
              f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        check(isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
              and math.isfinite(self.temperature) and self.temperature >= 0,
              f"temperature must be a number >= 0, got {self.temperature!r}")
        check(isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool) and 0 < self.top_p <= 1,
              f"top_p must be within (0, 1], got {self.top_p!r}")
        check(is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is not None:
            check(isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop),
                  f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
            object.__setattr__(self, "stop", tuple(stop) or None)
        if self.stop_token_ids is not None:
            check(isinstance(self.stop_token_ids, (list, tuple)) and all(is_int(t) and t >= 0
                                                                        for t in self.stop_token_ids),
                  f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        check(self.seed is None or is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        check(self.logprobs is None or (is_int(self.logprobs) and self.logprobs >= 0),
              f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")
        for name in ("prompt_logprobs", "echo", "ignore_eos"):
            check(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability, and the top alternatives at its position (most likely first)."""
    token_id: int
    logprob: float
    top: tuple = ()     # ((token_id, logprob), ...)


@dataclass(frozen=True)
class BlockInfo:
    """The block a request ran in: its index in the call, sequences in it, its padded
    prompt length, the token steps it ran and its wall time."""
    index: int
    batch_size: int
    prompt_len: int
    new_tokens: int
    time_s: float


@dataclass
class RequestOutput:
    prompt: Optional[str]
    prompt_token_ids: list
    text: str
    token_ids: list
    finish_reason: str                       # "length", "stop" or "eos"
    logprobs: Optional[list] = None          # TokenLogprob per generated token
    prompt_logprobs: Optional[list] = None   # None, then TokenLogprob per later prompt token
    block: Optional[BlockInfo] = None


Prompt = Union[str, Sequence[int]]


class LLM:
    """A model placed for batch generation; see the module docstring.

    model: a checkpoint directory, a Hugging Face id in the local cache, or (dummy=True)
    a named size. policy: a Policy, a policy JSON file, or None / "auto": the optimizer
    chooses one for the budgets (GiB; defaults: the CUDA device's free memory or half of
    the host's available memory for the gpu tier, available host memory, free disk) and
    for the lengths of the prompts it is given, and chooses again when a longer batch
    arrives. compress_weight / compress_cache: 4-bit (a fixed policy gets them; the
    optimizer may use them). tokenizer: a tokenizer or its path (default: the checkpoint's).
    """

    def __init__(self, model: str, policy: Union[Policy, str, Path, None] = None, *,
                 gpu_mem: Optional[float] = None, cpu_mem: Optional[float] = None, disk_mem: Optional[float] = None,
                 offload_dir=None, device=None, dtype=None, compress_weight: bool = False,
                 compress_cache: bool = False, tokenizer=None, hardware=None, dummy: bool = False, seed: int = 0,
                 progress: bool = True):
        from flexgen.checkpoint import resolve_source
        from flexgen.engine import default_offload_dir

        self.model_name = str(model)
        self.offload_dir = Path(offload_dir).expanduser() if offload_dir else default_offload_dir()
        self._load_kw = dict(device=device, dtype=dtype, offload_dir=self.offload_dir, dummy=dummy, seed=seed,
                             progress=progress)
        self._budgets = dict(gpu_mem=gpu_mem, cpu_mem=cpu_mem, disk_mem=disk_mem, hardware=hardware)
        self._compress = dict(compress_weight=compress_weight, compress_cache=compress_cache)
        if isinstance(policy, (str, Path)) and str(policy) != "auto":
            policy = Policy.load(policy)
        if isinstance(policy, Policy):
            policy = dataclasses.replace(policy, compress_weight=policy.compress_weight or compress_weight,
                                         compress_cache=policy.compress_cache or compress_cache)
        elif policy not in (None, "auto"):
            raise FlexGenError(f"policy must be a Policy, a policy JSON file or 'auto', got {policy!r}")
        self._fixed_policy: Optional[Policy] = policy if isinstance(policy, Policy) else None
        source = resolve_source(self.model_name, dummy, seed)
        self.args = source.args
        self.tokenizer = _load_tokenizer(tokenizer, getattr(source, "path", None))
        if hasattr(source, "close"):
            source.close()
        self._model = None
        self._planned = (0, 0, False)   # (prompt_len, gen_len, block shrunk to the batch) of the policy

    # -- the model ---------------------------------------------------------------------

    @property
    def model(self):
        """The placed `FlexGenModel` (None before the first `generate` with an automatic policy)."""
        return self._model

    @property
    def policy(self) -> Optional[Policy]:
        return self._model.policy if self._model is not None else self._fixed_policy

    def _ensure_model(self, prompt_len: int, gen_len: int, num_prompts: int) -> None:
        from flexgen.engine import load_model

        policy = self._fixed_policy
        if policy is None:
            plen, glen, capped = self._planned
            if self._model is not None and prompt_len + gen_len <= plen + glen and not (
                    capped and num_prompts > self._model.policy.block_size):
                return
            policy, capped = self._choose_policy(prompt_len, gen_len, num_prompts)
            self._planned = (prompt_len, gen_len, capped)
            if self._model is not None and self._model.policy == policy:
                return
        elif self._model is not None:
            return
        if self._model is not None:
            self._model.close()
            self._model = None
        # Memory is checked for this batch's lengths before anything is placed.
        self._model = load_model(self.model_name, policy, prompt_len=prompt_len, gen_len=gen_len, **self._load_kw)

    def _choose_policy(self, prompt_len: int, gen_len: int, num_prompts: int) -> tuple[Policy, bool]:
        """The optimizer's policy; a block larger than the batch is shrunk to it (padding
        rows would only cost time), and such a policy is chosen again for a larger batch."""
        from flexgen.autopolicy import choose_policy

        policy, est, capped = choose_policy(
            self.args, prompt_len, gen_len, offload_dir=self.offload_dir, device=self._load_kw["device"],
            dtype=self._load_kw["dtype"], compress_weight=self._compress["compress_weight"],
            compress_cache=self._compress["compress_cache"], num_prompts=num_prompts, default_budgets=True,
            **self._budgets)
        pct = " ".join(f"{getattr(policy, f):g}" for f in ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent",
                                                          "cache_cpu_percent", "act_gpu_percent", "act_cpu_percent"))
        flags = [f for f in ("overlap", "cpu_cache_compute", "compress_weight", "compress_cache") if getattr(policy, f)]
        print(f"flexgen: policy for prompts up to {prompt_len} tokens + {gen_len} new: block "
              f"{policy.gpu_batch_size} x {policy.num_gpu_batches}, --percent {pct}, {', '.join(flags) or 'no flags'}"
              f" (predicted {est.throughput:.2f} token/s)", file=sys.stderr)
        return policy, capped

    # -- generation --------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params=None, *, progress: bool = True) -> list[RequestOutput]:
        """Continue every prompt (strings or token-id lists); results in input order."""
        results: list = [None] * len(prompts)
        for pairs in self.generate_blocks(prompts, params, progress=progress):
            for i, out in pairs:
                results[i] = out
        return results

    def generate_blocks(self, prompts: Sequence[Prompt], params=None, *,
                        progress: bool = True) -> Iterator[list[tuple[int, RequestOutput]]]:
        """Like `generate`, but yields each block's (input index, output) pairs as soon as
        the block is done, for jobs that save results as they go."""
        prompts = list(prompts)
        n = len(prompts)
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * n
        params = list(params)
        if len(params) != n:
            raise FlexGenError(f"got {n} prompts but {len(params)} sampling params")
        if not all(isinstance(p, SamplingParams) for p in params):
            raise FlexGenError("params must be SamplingParams (one, or one per prompt)")
        if n == 0:
            return
        ids = [self._encode(p, i) for i, p in enumerate(prompts)]
        for i, (t, p) in enumerate(zip(ids, params)):
            if p.stop and self.tokenizer is None:
                raise FlexGenError("stop strings need a tokenizer (pass tokenizer=...)")
            if len(t) + max(1, p.max_new_tokens) > self.args.max_position_embeddings:
                raise FlexGenError(f"prompt {i}: {len(t)} tokens + {p.max_new_tokens} new exceed the model's "
                                   f"{self.args.max_position_embeddings} positions")
        self._ensure_model(max(len(t) for t in ids), max(max(1, p.max_new_tokens) for p in params), n)
        model = self._model
        B = model.policy.block_size
        # Longest first: padding stays low within a block, and a block that does not fit
        # in memory fails at the start of the job, not at its end.
        order = sorted(range(n), key=lambda i: (-len(ids[i]), -params[i].max_new_tokens))
        from tqdm import tqdm
        model.begin_stats()
        t_start, tokens = time.perf_counter(), 0
        with tqdm(total=n, unit="seq", desc="generating", disable=not progress, dynamic_ncols=True) as bar:
            for b, start in enumerate(range(0, n, B)):
                rows = order[start:start + B]
                outs = self._run_block(b, [prompts[i] for i in rows], [ids[i] for i in rows],
                                       [params[i] for i in rows])
                tokens += sum(len(o.token_ids) for o in outs)
                bar.update(len(rows))
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - t_start):.2f} token/s", refresh=False)
                yield list(zip(rows, outs))
        model.end_stats()

    @property
    def stats(self):
        """The engine's figures (`GenerationStats`) of the last generate call."""
        return self._model.stats if self._model is not None else None

    def _encode(self, prompt: Prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise FlexGenError("text prompts need a tokenizer: this model has none (pass tokenizer=..., "
                                   "or token-id lists)")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise FlexGenError(f"prompt {i}: a prompt is a string or a list of token ids") from None
            if any(isinstance(t, bool) for t in prompt):
                raise FlexGenError(f"prompt {i}: token ids must be integers")
        if not ids:
            raise FlexGenError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise FlexGenError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {self.args.vocab_size})")
        return ids

    def _run_block(self, index: int, prompts: list, ids: list[list[int]], params: list[SamplingParams]):
        model, args = self._model, self.args
        B, real = model.policy.block_size, len(ids)
        dev = model.device.device
        P = max(len(t) for t in ids)
        G = max(max(1, p.max_new_tokens) for p in params)
        input_ids = torch.full((real, P), args.pad_token_id, dtype=torch.long)
        mask = torch.zeros((real, P), dtype=torch.long)
        for r, t in enumerate(ids):
            input_ids[r, P - len(t):] = torch.tensor(t)
            mask[r, P - len(t):] = 1
        full = params + [params[0]] * (B - real)   # settings of the padding rows never matter
        sampler = RowSampler([p.temperature for p in full], [p.top_k for p in full], [p.top_p for p in full],
                             [torch.Generator(device=dev).manual_seed(p.seed)
                              if p.seed is not None and p.temperature > 0 else None for p in full], dev)
        stopper = StopCriteria(
            B, [[] if p.ignore_eos else list(args.eos_token_ids) for p in full], [], args.pad_token_id, dev,
            stop_ids=[list(p.stop_token_ids or ()) for p in full], max_new=[max(1, p.max_new_tokens) for p in full],
            text_stop=self._text_stop([p.stop for p in full]) if any(p.stop for p in params) else None)
        want_lp = [p.logprobs is not None for p in params]
        want_prompt = any(p.prompt_logprobs for p in params)
        recorder = None
        if any(want_lp) or want_prompt:
            k = max((p.logprobs or 0) for p in params)
            recorder = LogprobRecorder(B, G, top_k=k, prompt_len=P if want_prompt else 0)
        t0 = time.perf_counter()
        block = model.generate_block(input_ids, mask, G, sampler=sampler, stopper=stopper, recorder=recorder)
        info = BlockInfo(index, real, P, block.steps_done, time.perf_counter() - t0)
        output = block.output.cpu()
        done, length, reason = stopper.done.cpu(), stopper.length.cpu(), stopper.reason.cpu()
        outs = []
        for r in range(real):
            p = params[r]
            n_tok = int(length[r]) if done[r] else block.steps_done
            n_tok = min(n_tok, p.max_new_tokens)
            toks = output[r, :n_tok].tolist()
            finish = REASON_NAMES.get(int(reason[r]), "length") if n_tok else "length"
            text = self.tokenizer.decode(toks, skip_special_tokens=True) if self.tokenizer is not None else ""
            if p.stop:
                cut = min((pos for pos in (text.find(s) for s in p.stop) if pos >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
            prompt_text = prompts[r] if isinstance(prompts[r], str) else None
            if p.echo:
                shown = prompt_text if prompt_text is not None else (
                    self.tokenizer.decode(ids[r], skip_special_tokens=True) if self.tokenizer is not None else "")
                text = shown + text
            out = RequestOutput(prompt_text, list(ids[r]), text, toks, finish, block=info)
            if p.logprobs is not None:
                out.logprobs = [_token_logprob(t, recorder.token_logprob[r, s], recorder.top_ids[r, s],
                                               recorder.top_logprob[r, s], p.logprobs) for s, t in enumerate(toks)]
            if p.prompt_logprobs:
                first = P - len(ids[r])
                out.prompt_logprobs = [None] + [
                    _token_logprob(ids[r][c - first], recorder.prompt_logprob[r, c], recorder.prompt_top_ids[r, c],
                                   recorder.prompt_top_logprob[r, c], p.logprobs or 0)
                    for c in range(first + 1, P)]
            outs.append(out)
        return outs

    def _text_stop(self, stops: list):
        tok = self.tokenizer

        def hit(generated: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(generated.shape[0], dtype=torch.bool)
            rows = [r for r in range(generated.shape[0]) if stops[r] and bool(active[r])]
            if rows:
                texts = tok.batch_decode(generated[rows].tolist(), skip_special_tokens=True)
                for r, text in zip(rows, texts):
                    out[r] = any(s in text for s in stops[r])
            return out
        return hit

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Release memory and this run's offload files (the weight store stays)."""
        if self._model is not None:
            self._model.close()
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _token_logprob(token: int, lp, top_ids, top_lp, k: int) -> TokenLogprob:
    top = tuple((int(i), float(v)) for i, v in zip(top_ids[:k].tolist(), top_lp[:k].tolist()))
    return TokenLogprob(int(token), float(lp), top)


def _load_tokenizer(tokenizer, checkpoint: Optional[Path]):
    """The given tokenizer, one loaded from a path, or the checkpoint's own (None if it has none)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    path = tokenizer if tokenizer is not None else checkpoint
    if path is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:   # no tokenizer files, or unreadable ones
        if tokenizer is not None:
            raise FlexGenError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0][:200]}") from None
        return None


__all__ = ["LLM", "SamplingParams", "RequestOutput", "TokenLogprob", "BlockInfo"]
