"""Mistral: the LLaMA layout (llama.py's layers) with sliding-window attention.

A query at cache slot p attends to slots (p - sliding_window, p], as transformers counts
them; the cache itself still keeps every position (no rolling buffer), so memory grows
with the sequence as for LLaMA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flexgen.errors import FlexGenError
from flexgen.models import llama
from flexgen.models.llama import (attention_core, attention_in, attention_out, cost_figures,  # noqa: F401
                                  input_embed, layer_specs, mlp, output_embed, self_attention)

MODEL_TYPES = ("mistral",)

# mistralai/Mistral-7B-v0.1. A checkpoint's config.json wins (v0.2+ has no window).
SIZES: dict[str, dict] = {
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
                       rms_norm_eps=1e-5, sliding_window=4096, bos_token_id=1, eos_token_id=2),
}


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    sizes: ClassVar[dict] = SIZES

    @classmethod
    def from_config(cls, config: dict, name: str = "mistral") -> "ModelArgs":
        if config.get("model_type") not in MODEL_TYPES:
            raise FlexGenError(f"{name}: model_type is {config.get('model_type')!r}, not mistral")
        return cls(name=name, **llama._common_config(config, name), sliding_window=config.get("sliding_window") or 0)

    def to_hf_config(self) -> dict:
        return dict(super().to_hf_config(), model_type="mistral", sliding_window=self.sliding_window or None)
