"""OPT (and OPT-IML / Galactica-style configs): model arguments, weight layout, pure layers.

The scheduler streams the model as a list of *layers*: the input embedding, then an
attention layer and an MLP layer for each decoder block, then the output embedding.
Each layer has a named weight dataclass and a pure compute function; tensor names are
the Hugging Face parameter names (under `decoder.`), so checkpoints map one to one.

Activations are (batch, seq, hidden). The KV cache is time-major, (seq, batch, hidden),
because that makes a prefix read and a one-token append contiguous on every tier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from flexgen.errors import FlexGenError
from flexgen.models.base import (AttendGroup, CostFigures, KVAccess, LayerSpec, WeightEntry,  # noqa: F401
                                 attend, attend_groups, build_weights)

MODEL_TYPES = ("opt",)

# Named sizes from the OPT paper / Hugging Face configs. A checkpoint's config.json wins.
OPT_SIZES: dict[str, dict] = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "opt-2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480),
    "opt-30b": dict(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672),
    "opt-66b": dict(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864),
    "opt-175b": dict(hidden_size=12288, num_hidden_layers=96, num_attention_heads=96, ffn_dim=49152),
}
SIZES = OPT_SIZES


@dataclass(frozen=True)
class ModelArgs:
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    ffn_dim: int
    vocab_size: int = 50272
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 0  # 0: same as hidden_size
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    def __post_init__(self):
        if self.word_embed_proj_dim == 0:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise FlexGenError(f"{self.name}: hidden_size {self.hidden_size} is not divisible by "
                               f"num_attention_heads {self.num_attention_heads}")
        if self.activation_function not in _ACTIVATIONS:
            raise FlexGenError(f"{self.name}: unsupported activation {self.activation_function!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def kv_width(self) -> int:
        """Values of K (and of V) per token per layer."""
        return self.hidden_size

    @property
    def has_projection(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        key = name.lower().split("/")[-1]
        if key not in OPT_SIZES:
            raise FlexGenError(f"unknown model {name!r}; named sizes: {', '.join(OPT_SIZES)} "
                               "(or give a checkpoint directory)")
        return cls(name=key, **OPT_SIZES[key])

    @classmethod
    def from_config(cls, config: dict, name: str = "opt") -> "ModelArgs":
        """From a Hugging Face OPT config.json dict."""
        if config.get("model_type") != "opt":
            raise FlexGenError(f"{name}: model_type is {config.get('model_type')!r}; only OPT is supported")
        eos = config.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0]
        try:
            return cls(
                name=name,
                hidden_size=config["hidden_size"],
                num_hidden_layers=config["num_hidden_layers"],
                num_attention_heads=config["num_attention_heads"],
                ffn_dim=config["ffn_dim"],
                vocab_size=config.get("vocab_size", 50272),
                max_position_embeddings=config.get("max_position_embeddings", 2048),
                word_embed_proj_dim=config.get("word_embed_proj_dim") or 0,
                do_layer_norm_before=config.get("do_layer_norm_before", True),
                remove_final_layer_norm=config.get("_remove_final_layer_norm", False),
                enable_bias=config.get("enable_bias", True),
                layer_norm_elementwise_affine=config.get("layer_norm_elementwise_affine", True),
                activation_function=config.get("activation_function", "relu"),
                tie_word_embeddings=config.get("tie_word_embeddings", True),
                pad_token_id=config.get("pad_token_id") if config.get("pad_token_id") is not None else 1,
                bos_token_id=config.get("bos_token_id") if config.get("bos_token_id") is not None else 2,
                eos_token_id=eos if eos is not None else 2,
            )
        except KeyError as e:
            raise FlexGenError(f"{name}: config.json lacks {e.args[0]!r}") from None

    @classmethod
    def from_config_file(cls, path: Path, name: str) -> "ModelArgs":
        try:
            return cls.from_config(json.loads(Path(path).read_text()), name=name)
        except json.JSONDecodeError as e:
            raise FlexGenError(f"{path}: not valid JSON ({e})") from None

    def to_hf_config(self) -> dict:
        """A Hugging Face config dict (for building reference models in tests)."""
        return dict(model_type="opt", hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                    num_attention_heads=self.num_attention_heads, ffn_dim=self.ffn_dim,
                    vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings,
                    word_embed_proj_dim=self.word_embed_proj_dim, do_layer_norm_before=self.do_layer_norm_before,
                    _remove_final_layer_norm=self.remove_final_layer_norm, enable_bias=self.enable_bias,
                    layer_norm_elementwise_affine=self.layer_norm_elementwise_affine,
                    activation_function=self.activation_function,
                    tie_word_embeddings=self.tie_word_embeddings, pad_token_id=self.pad_token_id,
                    bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)

    def num_parameters(self) -> int:
        return sum(e.numel for spec in layer_specs(self) for e in spec.entries
                   if not (spec.kind == "output" and e.field == "lm_head" and self.tie_word_embeddings))


# ---------------------------------------------------------------------------------------
# Weight layout: every layer's tensors with their HF names and shapes.

def layer_specs(args: ModelArgs) -> list[LayerSpec]:
    """The streamed layers in execution order, with their weights."""
    h, f, v, p = args.hidden_size, args.ffn_dim, args.vocab_size, args.word_embed_proj_dim
    E = WeightEntry

    def linear(field, name, out_dim, in_dim):
        out = [E(f"{field}_weight", f"{name}.weight", (out_dim, in_dim))]
        if args.enable_bias:
            out.append(E(f"{field}_bias", f"{name}.bias", (out_dim,)))
        return out

    def norm(field, name, dim):
        if not args.layer_norm_elementwise_affine:
            return []
        return [E(f"{field}_weight", f"{name}.weight", (dim,), init="ones"), E(f"{field}_bias", f"{name}.bias", (dim,))]

    specs = []
    inp = [E("embed_tokens", "decoder.embed_tokens.weight", (v, p)),
           E("embed_positions", "decoder.embed_positions.weight", (args.max_position_embeddings + 2, h))]
    if args.has_projection:
        inp.append(E("project_in", "decoder.project_in.weight", (h, p)))
    specs.append(LayerSpec("input", -1, tuple(inp), InputEmbedWeights))
    for i in range(args.num_hidden_layers):
        pre = f"decoder.layers.{i}"
        attn = (linear("q_proj", f"{pre}.self_attn.q_proj", h, h) + linear("k_proj", f"{pre}.self_attn.k_proj", h, h)
                + linear("v_proj", f"{pre}.self_attn.v_proj", h, h)
                + linear("out_proj", f"{pre}.self_attn.out_proj", h, h)
                + norm("self_attn_layer_norm", f"{pre}.self_attn_layer_norm", h))
        mlp = (linear("fc1", f"{pre}.fc1", f, h) + linear("fc2", f"{pre}.fc2", h, f)
               + norm("final_layer_norm", f"{pre}.final_layer_norm", h))
        specs.append(LayerSpec("attention", i, tuple(attn), AttentionWeights))
        specs.append(LayerSpec("mlp", i, tuple(mlp), MLPWeights))
    out = []
    if args.has_final_layer_norm:
        out += norm("final_layer_norm", "decoder.final_layer_norm", h)
    if args.has_projection:
        out.append(E("project_out", "decoder.project_out.weight", (p, h)))
    # A tied LM head is the input embedding; this layer keeps its own copy so each layer
    # streams independently. An untied one is the checkpoint's lm_head.weight.
    head = "decoder.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
    out.append(E("lm_head", head, (v, p)))
    specs.append(LayerSpec("output", -1, tuple(out), OutputEmbedWeights))
    return specs


# ---------------------------------------------------------------------------------------
# Named weights of each layer kind. Optional fields are absent when the config disables them.

@dataclass
class InputEmbedWeights:
    embed_tokens: torch.Tensor
    embed_positions: torch.Tensor
    project_in: Optional[torch.Tensor] = None


@dataclass
class AttentionWeights:
    q_proj_weight: torch.Tensor
    k_proj_weight: torch.Tensor
    v_proj_weight: torch.Tensor
    out_proj_weight: torch.Tensor
    q_proj_bias: Optional[torch.Tensor] = None
    k_proj_bias: Optional[torch.Tensor] = None
    v_proj_bias: Optional[torch.Tensor] = None
    out_proj_bias: Optional[torch.Tensor] = None
    self_attn_layer_norm_weight: Optional[torch.Tensor] = None
    self_attn_layer_norm_bias: Optional[torch.Tensor] = None


@dataclass
class MLPWeights:
    fc1_weight: torch.Tensor
    fc2_weight: torch.Tensor
    fc1_bias: Optional[torch.Tensor] = None
    fc2_bias: Optional[torch.Tensor] = None
    final_layer_norm_weight: Optional[torch.Tensor] = None
    final_layer_norm_bias: Optional[torch.Tensor] = None


@dataclass
class OutputEmbedWeights:
    lm_head: torch.Tensor
    final_layer_norm_weight: Optional[torch.Tensor] = None
    final_layer_norm_bias: Optional[torch.Tensor] = None
    project_out: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------
# Pure layer functions.

# ReLU in place: fc1's output is a temporary, and a fresh (b, s, ffn) buffer per layer costs
# page faults on the CPU.
_ACTIVATIONS = {"relu": torch.relu_, "gelu": F.gelu}


def _layer_norm(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps=1e-5)


def input_embed(w: InputEmbedWeights, input_ids: torch.Tensor, position_ids: torch.Tensor,
                args: Optional[ModelArgs] = None) -> torch.Tensor:
    """input_ids, position_ids: (b, s) -> hidden (b, s, h). Positions are 0-based; OPT adds 2."""
    x = F.embedding(input_ids, w.embed_tokens)
    if w.project_in is not None:
        x = F.linear(x, w.project_in)
    return x + F.embedding(position_ids + 2, w.embed_positions)


def self_attention(w: AttentionWeights, x: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                   kv: KVAccess, args: ModelArgs) -> torch.Tensor:
    """x (b, s, h); mask bool (b, s, t) over all positions attended to. Returns (b, s, h).
    OPT's positions enter at the input embedding; position_ids is unused here.

    Prefill (s = prompt length) and decode (s = 1) share this code; `kv` decides where
    keys and values live and which device attends for which rows (cpu_cache_compute).
    """
    q, k, v = attention_in(w, x, position_ids, args)
    return attention_out(w, x, attention_core(q, k, v, mask, kv, args), args)


def attention_in(w: AttentionWeights, x: torch.Tensor, position_ids: torch.Tensor, args: ModelArgs):
    """The projections before attention: q (scaled), k, v, each (b, s, width). Row-wise,
    so one call may cover several gpu batches."""
    if args.do_layer_norm_before:
        x = _layer_norm(x, w.self_attn_layer_norm_weight, w.self_attn_layer_norm_bias)
    q = F.linear(x, w.q_proj_weight, w.q_proj_bias) * (args.head_dim ** -0.5)
    return q, F.linear(x, w.k_proj_weight, w.k_proj_bias), F.linear(x, w.v_proj_weight, w.v_proj_bias)


def attention_core(q, k, v, mask, kv: KVAccess, args: ModelArgs) -> torch.Tensor:
    """Attention of one gpu batch over its KV cache (k, v of this step appended)."""
    return attend_groups(q, kv.update(k, v), mask, args.num_attention_heads)


def attention_out(w: AttentionWeights, x: torch.Tensor, attn: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The output projection and the residual (x: the layer's input). Row-wise."""
    x = x + F.linear(attn, w.out_proj_weight, w.out_proj_bias)
    if not args.do_layer_norm_before:
        x = _layer_norm(x, w.self_attn_layer_norm_weight, w.self_attn_layer_norm_bias)
    return x


def mlp(w: MLPWeights, x: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    residual = x
    if args.do_layer_norm_before:
        x = _layer_norm(x, w.final_layer_norm_weight, w.final_layer_norm_bias)
    x = _ACTIVATIONS[args.activation_function](F.linear(x, w.fc1_weight, w.fc1_bias))
    x = residual + F.linear(x, w.fc2_weight, w.fc2_bias)
    if not args.do_layer_norm_before:
        x = _layer_norm(x, w.final_layer_norm_weight, w.final_layer_norm_bias)
    return x


def output_embed(w: OutputEmbedWeights, x: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Hidden of the last position (b, h) -> logits (b, vocab) in float32."""
    # A non-affine final LayerNorm has no weights but is still applied.
    if args.has_final_layer_norm:
        x = _layer_norm(x, w.final_layer_norm_weight, w.final_layer_norm_bias)
    if w.project_out is not None:
        x = F.linear(x, w.project_out)
    return F.linear(x, w.lm_head).float()


def cost_figures(args: ModelArgs) -> CostFigures:
    h, f = args.hidden_size, args.ffn_dim
    # Peaks beyond the layer's input, as self_attention / mlp allocate (measured against the
    # engine in tests/test_memory_model.py). Attention, at the residual add: the normed
    # input, q, k, v, the attention output, out_proj's output and the sum: 7h. MLP, ReLU
    # in place: fc1's output, fc2's and the sum (2h + f); GELU keeps the normed input,
    # fc1's output and its activation at once (h + 2f).
    mlp = h + 2 * f if args.activation_function != "relu" else 2 * h + f
    return CostFigures(q_width=h, kv_width=h, attn_temp_width=7 * h, mlp_temp_width=mlp)
