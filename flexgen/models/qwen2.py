"""Qwen2 / Qwen2.5: the LLaMA layout (llama.py's layers) with a bias on q, k and v
(not on o_proj), and a head tied to the embedding in the small sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flexgen.errors import FlexGenError
from flexgen.models import llama
from flexgen.models.llama import (attention_core, attention_in, attention_out, cost_figures,  # noqa: F401
                                  input_embed, layer_specs, mlp, output_embed, self_attention)

MODEL_TYPES = ("qwen2",)

_Q = dict(max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
          bos_token_id=151643, eos_token_id=151643)
_QS = dict(_Q, vocab_size=151936, tie_word_embeddings=True)                  # 0.5b - 3b
_QL = dict(_Q, vocab_size=152064, max_position_embeddings=131072)            # 7b and up

# Named sizes from the Hugging Face configs (Qwen/Qwen2.5-*). A checkpoint's config.json wins.
SIZES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(_QS, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864),
    "qwen2.5-1.5b": dict(_QS, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960),
    "qwen2.5-3b": dict(_QS, hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       intermediate_size=11008),
    "qwen2.5-7b": dict(_QL, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944),
    "qwen2.5-14b": dict(_QL, hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        intermediate_size=13824, rms_norm_eps=1e-5),
    "qwen2.5-32b": dict(_QL, hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                        intermediate_size=27648, rms_norm_eps=1e-5),
    "qwen2.5-72b": dict(_QL, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=29568, rms_norm_eps=1e-5),
}


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    sizes: ClassVar[dict] = SIZES

    @classmethod
    def from_config(cls, config: dict, name: str = "qwen2") -> "ModelArgs":
        if config.get("model_type") not in MODEL_TYPES:
            raise FlexGenError(f"{name}: model_type is {config.get('model_type')!r}, not qwen2")
        if config.get("use_sliding_window"):
            raise FlexGenError(f"{name}: use_sliding_window=true is not supported for qwen2 (its window applies "
                               "to some layers only); set it to false")
        return cls(name=name, **llama._common_config(config, name), qkv_bias=True)

    def to_hf_config(self) -> dict:
        cfg = dict(super().to_hf_config(), model_type="qwen2", use_sliding_window=False)
        cfg.pop("attention_bias")
        cfg.pop("mlp_bias")
        return cfg
