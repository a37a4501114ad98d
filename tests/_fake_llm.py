"""Stand-in for flexgen.LLM until the batch API lands (HF transformers greedy, fp32)."""
from dataclasses import dataclass, field
from typing import Optional
import time, torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Optional[list] = None
    stop_token_ids: Optional[list] = None
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    prompt_logprobs: bool = False
    echo: bool = False
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list = field(default_factory=list)


@dataclass
class BlockInfo:
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
    finish_reason: str
    logprobs: Optional[list]
    prompt_logprobs: Optional[list]
    block: BlockInfo


class LLM:
    calls = []

    def __init__(self, model, policy=None, **kw):
        from transformers import AutoTokenizer, OPTForCausalLM
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        self.model = OPTForCausalLM.from_pretrained(str(model)).eval()
        self.model_name = str(model)
        self.block = 4

    def generate(self, prompts, params=None, *, progress=True):
        LLM.calls.append(len(prompts))
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        outs = []
        for b0 in range(0, len(prompts), self.block):
            t0 = time.perf_counter()
            chunk = []
            for p, sp in zip(prompts[b0:b0 + self.block], params[b0:b0 + self.block]):
                ids = self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
                seq = list(ids)
                lps = []
                reason = "length"
                with torch.no_grad():
                    logits = self.model(torch.tensor([seq])).logits[0].float().log_softmax(-1)
                plp = [None] + [TokenLogprob(t, logits[i, t].item()) for i, t in enumerate(seq[1:])]
                gen = []
                for _ in range(sp.max_new_tokens):
                    with torch.no_grad():
                        lp = self.model(torch.tensor([seq + gen])).logits[0, -1].float().log_softmax(-1)
                    t = int(lp.argmax())
                    gen.append(t); lps.append(TokenLogprob(t, lp[t].item()))
                    if t == self.tokenizer.eos_token_id and not sp.ignore_eos:
                        reason = "eos"; break
                    text = self.tokenizer.decode(gen, skip_special_tokens=True)
                    if sp.stop and any(s in text for s in sp.stop):
                        reason = "stop"; break
                text = self.tokenizer.decode(gen, skip_special_tokens=True)
                if sp.stop:
                    for s in sp.stop:
                        if s in text: text = text[:text.index(s)]
                if sp.echo:
                    text = self.tokenizer.decode(ids) + text
                chunk.append([p if isinstance(p, str) else None, ids, text, gen, reason, lps,
                              plp if sp.prompt_logprobs else None])
            dt = time.perf_counter() - t0
            for c in chunk:
                outs.append(RequestOutput(*c, BlockInfo(b0 // self.block, len(chunk), 0, 0, dt)))
        return outs

    def close(self):
        pass
