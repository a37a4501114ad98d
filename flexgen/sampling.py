"""Next-token choice and stopping, Hugging Face semantics.

Sampling: logits / temperature, then top-k, then top-p (nucleus; the most likely token
always stays), then a draw from `generator` (or torch's global RNG, as HF does).
Stopping: a row ends after an EOS token or a stop sequence; later tokens are padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from flexgen.errors import FlexGenError


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise FlexGenError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FlexGenError(f"top_p must be within (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise FlexGenError(f"top_k must be >= 0, got {self.top_k}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None):
    """logits (b, vocab) float32 -> token ids (b,)."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - params.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class StopCriteria:
    """Tracks which rows have ended."""

    def __init__(self, rows: int, eos_token_ids: Sequence[int], stop: Sequence[Sequence[int]], pad_token_id: int,
                 device: torch.device):
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
        self.stop = [list(s) for s in stop if len(s)]
        self.pad = pad_token_id
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.history: list[torch.Tensor] = []

    def apply(self, rows: slice, tokens: torch.Tensor) -> torch.Tensor:
        """Replace tokens of ended rows by padding and mark rows that end now."""
        done = self.done[rows]
        tokens = torch.where(done, torch.full_like(tokens, self.pad), tokens)
        if self.eos.numel():
            done = done | torch.isin(tokens, self.eos)
        self.done[rows] = done
        return tokens

    def check_stop_sequences(self, generated: torch.Tensor) -> None:
        """generated (rows, n): mark rows whose output ends with a stop sequence."""
        for seq in self.stop:
            n = len(seq)
            if generated.shape[1] >= n:
                hit = (generated[:, -n:] == torch.tensor(seq, device=generated.device)).all(dim=1)
                self.done |= hit

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())
