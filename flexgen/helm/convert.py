"""HELM `Request`s to engine prompts and `SamplingParams`, engine outputs to HELM `RequestResult`s.

A HELM request maps onto one engine sequence per completion; logprobs are the engine's own
(the chosen token's log-probability, with the prompt's when HELM asks to echo it).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

from flexgen.errors import FlexGenError


@dataclass
class Prepared:
    """The engine inputs of one HELM request: its prompt and sampling params per completion."""

    prompt: object  # the prompt text, or token ids when it had to be changed to fit
    length: int  # prompt tokens
    params: list  # flexgen.SamplingParams, one per completion
    truncated: int = 0  # prompt tokens dropped on the left to fit the model's positions
    error: Optional[str] = None


def prepare(request, tokenizer, max_sequence_length: Optional[int]) -> Prepared:
    """Tokenize a request's prompt with the checkpoint's tokenizer and build its sampling params."""
    import flexgen

    def fail(msg: str) -> Prepared:
        return Prepared(None, 0, [], error=msg)

    if request.embedding:
        return fail("flexgen computes no embeddings")
    if request.messages or request.multimodal_prompt is not None:
        return fail("flexgen takes text prompts only (no chat messages, no multimodal input)")
    if request.max_tokens < 0:
        return fail(f"max_tokens must be >= 0, got {request.max_tokens}")
    if request.presence_penalty or request.frequency_penalty:
        return fail("flexgen has no presence or frequency penalty")
    prompt: object = request.prompt
    ids = list(tokenizer(request.prompt)["input_ids"])
    if not ids:  # an empty prompt still needs one position to predict from
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        prompt = ids = [start]
    truncated = 0
    if max_sequence_length is not None:
        room = max_sequence_length - max(1, request.max_tokens)  # the engine runs at least one step
        if room < 1:
            return fail(f"max_tokens {request.max_tokens} leaves no room for a prompt in {max_sequence_length} "
                        "positions")
        if len(ids) > room:  # HELM's window service fits prompts with its own count; this is a safety net
            truncated = len(ids) - room
            keep = 1 if ids[0] == tokenizer.bos_token_id else 0
            prompt = ids = ids[:keep] + ids[keep + truncated:]
    params = []
    for i in range(request.num_completions):
        seed = None
        if request.temperature > 0:  # distinct but reproducible samples per completion
            seed = zlib.crc32(f"{request.random}|{i}|{request.prompt}".encode()) & 0x7FFFFFFF
        params.append(flexgen.SamplingParams(
            max_new_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
            stop=list(request.stop_sequences) or None, seed=seed, logprobs=0,
            prompt_logprobs=request.echo_prompt, echo=request.echo_prompt))
    return Prepared(prompt, len(ids), params, truncated)


def _kept_tokens(token_ids: Sequence[int], text: str, tokenizer) -> int:
    """How many leading generated tokens lie wholly inside `text` (the output cut before a stop string or
    end of text); a token that straddles the cut is dropped, as HELM's own truncation does."""
    lo, hi = 0, len(token_ids)  # the longest prefix whose text starts `text`: a binary search, since a
    while lo < hi:              # prefix of a kept prefix is kept
        mid = (lo + hi + 1) // 2
        if text.startswith(tokenizer.decode(token_ids[:mid])):
            lo = mid
        else:
            hi = mid - 1
    return lo


def to_generated_output(request, out, tokenizer):
    """One engine `RequestOutput` as a HELM `GeneratedOutput` with per-token text and logprobs."""
    from helm.common.request import GeneratedOutput, Token

    tokens: list = []
    if request.echo_prompt:
        plps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        for tid, lp in zip(out.prompt_token_ids, plps):
            tokens.append(Token(text=tokenizer.decode([tid]), logprob=0.0 if lp is None else float(lp.logprob)))
    gen_ids = list(out.token_ids)
    gen_lps = list(out.logprobs or [])
    keep = len(gen_ids)
    if out.finish_reason in ("stop", "eos"):
        gen_text = out.text
        if request.echo_prompt:  # the engine's echo: the prompt text (decoded ids, if it got ids) first
            shown = out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids,
                                                                                skip_special_tokens=True)
            gen_text = gen_text[len(shown):] if gen_text.startswith(shown) else gen_text
        keep = _kept_tokens(gen_ids, gen_text, tokenizer)
    for i, tid in enumerate(gen_ids[:keep]):
        lp = float(gen_lps[i].logprob) if i < len(gen_lps) and gen_lps[i] is not None else 0.0
        tokens.append(Token(text=tokenizer.decode([tid]), logprob=lp))
    return GeneratedOutput(text=out.text, logprob=sum(t.logprob for t in tokens), tokens=tokens,
                           finish_reason={"reason": out.finish_reason})


def failed_result(error: str):
    from helm.common.request import ErrorFlags, RequestResult

    return RequestResult(success=False, cached=False, error=error, completions=[], embedding=[],
                         error_flags=ErrorFlags(is_retriable=False, is_fatal=True))


def generate(llm, requests: Sequence, *, max_sequence_length: Optional[int] = None, progress: bool = False) -> list:
    """Run HELM requests through `llm` in one batched call; returns one `RequestResult` per request.

    Every completion of every request goes to `llm.generate` at once (which groups prompts of
    similar length into blocks), and each result records the block it ran in: `batch_size`
    (sequences in the block) and `batch_request_time` (the block's seconds).
    """
    from helm.common.request import RequestResult

    tok = llm.tokenizer
    prepared = [prepare(r, tok, max_sequence_length) for r in requests]
    cut = sum(p.truncated > 0 for p in prepared)
    if cut:
        from helm.common.hierarchical_logger import hwarn

        hwarn(f"flexgen: {cut} prompt(s) cut on the left to fit {max_sequence_length} positions with their "
              "max_tokens (the engine's tokenization is longer than HELM's window count)")
    flat = [(i, j) for i, p in enumerate(prepared) if p.error is None for j in range(len(p.params))]
    started = time.time()
    outs = []
    if flat:
        outs = llm.generate([prepared[i].prompt for i, _ in flat], [prepared[i].params[j] for i, j in flat],
                            progress=progress)
        if len(outs) != len(flat):
            raise FlexGenError(f"the engine returned {len(outs)} outputs for {len(flat)} prompts")
    per_request: list[list] = [[None] * len(p.params) for p in prepared]
    for (i, j), out in zip(flat, outs):
        per_request[i][j] = out
    results = []
    for req, p, outs_i in zip(requests, prepared, per_request):
        if p.error is not None:
            results.append(failed_result(p.error))
            continue
        blocks = {o.block.index: o.block for o in outs_i}  # a request's completions may span blocks
        batch_time = sum(b.time_s for b in blocks.values())
        results.append(RequestResult(
            success=True, cached=False, embedding=[],
            completions=[to_generated_output(req, o, tok) for o in outs_i],
            request_time=batch_time, request_datetime=int(started),
            batch_size=max((b.batch_size for b in blocks.values()), default=None),
            batch_request_time=batch_time if blocks else None))
    return results
