"""LLaMA (2, 3, 3.1) and the models that share its layout: arguments, weight layout, pure layers.

RMSNorm before attention and MLP, rotary position embeddings (rope_theta, and the
"linear" and Llama 3.1 "llama3" rope_scaling), grouped-query attention (num_key_value_heads
K/V heads shared by the query heads), a SwiGLU MLP, and an untied or tied LM head.
mistral.py and qwen2.py reuse these layers: they differ only in config and named sizes
(Qwen2's q/k/v bias and Mistral's sliding window are ModelArgs fields here).

Streamed layers are the same as OPT's: input embedding, attention and MLP per decoder
block, output head. The KV cache holds K after rotation, as transformers does, time-major
(seq, batch, num_key_value_heads * head_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from flexgen.errors import FlexGenError
from flexgen.models.base import CostFigures, KVAccess, LayerSpec, WeightEntry, attend_groups, first_token_id

MODEL_TYPES = ("llama",)
ROPE_TYPES = ("default", "linear", "llama3")

_L2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
_L3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
           bos_token_id=128000, eos_token_id=128001)
_L31 = dict(_L3, max_position_embeddings=131072, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192)

# Named sizes from the Hugging Face configs (meta-llama/...). A checkpoint's config.json wins.
SIZES: dict[str, dict] = {
    "llama-2-7b": dict(_L2, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
    "llama-2-13b": dict(_L2, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824),
    "llama-2-70b": dict(_L2, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672),
    "llama-3-8b": dict(_L3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336),
    "llama-3-70b": dict(_L3, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672),
    "llama-3.1-8b": dict(_L31, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336),
    "llama-3.1-70b": dict(_L31, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          intermediate_size=28672),
    "llama-3.1-405b": dict(_L31, hidden_size=16384, num_hidden_layers=126, num_attention_heads=128,
                           num_key_value_heads=8, intermediate_size=53248),
}


@dataclass(frozen=True)
class ModelArgs:
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: int = 0          # 0: as many as query heads (no GQA)
    head_dim: int = 0                     # 0: hidden_size // num_attention_heads
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"            # "default" | "linear" | "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    qkv_bias: bool = False                # Qwen2: bias on q/k/v only
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int = 0               # 0: full attention (Mistral v0.1: 4096)
    hidden_act: str = "silu"
    pad_token_id: int = -1                # -1: the EOS token
    bos_token_id: int = 1
    eos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = ()   # every token that ends a sequence (Llama 3.1 instruct has 3)

    def __post_init__(self):
        if self.num_key_value_heads == 0:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise FlexGenError(f"{self.name}: hidden_size {self.hidden_size} is not divisible by "
                                   f"num_attention_heads {self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.pad_token_id < 0:
            object.__setattr__(self, "pad_token_id", self.eos_token_id)
        if not self.eos_token_ids:
            object.__setattr__(self, "eos_token_ids", (self.eos_token_id,))
        if self.num_attention_heads % self.num_key_value_heads:
            raise FlexGenError(f"{self.name}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                               f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise FlexGenError(f"{self.name}: rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise FlexGenError(f"{self.name}: rope_scaling type {self.rope_type!r} is not supported "
                               f"(supported: {', '.join(ROPE_TYPES)})")
        if self.hidden_act != "silu":
            raise FlexGenError(f"{self.name}: unsupported hidden_act {self.hidden_act!r} (only silu)")

    @property
    def kv_width(self) -> int:
        """Values of K (and of V) per token per layer: smaller than hidden_size under GQA."""
        return self.num_key_value_heads * self.head_dim

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    sizes: ClassVar[dict] = SIZES         # this family's named sizes; subclasses give their own

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        key = name.lower().split("/")[-1]
        if key not in cls.sizes:
            raise FlexGenError(f"unknown model {name!r}; named sizes: {', '.join(cls.sizes)} "
                               "(or give a checkpoint directory)")
        return cls(name=key, **cls.sizes[key])

    @classmethod
    def from_config(cls, config: dict, name: str = "llama") -> "ModelArgs":
        """From a Hugging Face LlamaConfig dict (transformers 4 or 5 layout)."""
        if config.get("model_type") not in MODEL_TYPES and config.get("model_type") is not None:
            raise FlexGenError(f"{name}: model_type is {config.get('model_type')!r}, not llama")
        return cls(name=name, **_common_config(config, name),
                   qkv_bias=bool(config.get("attention_bias", False)), o_bias=bool(config.get("attention_bias", False)),
                   mlp_bias=bool(config.get("mlp_bias", False)))

    def to_hf_config(self) -> dict:
        """A Hugging Face config dict (for building reference models in tests)."""
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings)
        return dict(model_type="llama", hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                    num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                    head_dim=self.head_dim, intermediate_size=self.intermediate_size, vocab_size=self.vocab_size,
                    max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
                    rope_theta=self.rope_theta, rope_scaling=rope, attention_bias=self.qkv_bias,
                    mlp_bias=self.mlp_bias, tie_word_embeddings=self.tie_word_embeddings,
                    hidden_act=self.hidden_act, pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
                    eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_id)

    def num_parameters(self) -> int:
        return sum(e.numel for spec in layer_specs(self) for e in spec.entries
                   if not (spec.kind == "output" and e.field == "lm_head" and self.tie_word_embeddings))


def _common_config(config: dict, name: str) -> dict:
    """The fields every LLaMA-layout config shares (llama, mistral, qwen2)."""
    # transformers 5 writes rope_parameters (theta included); 4.x wrote rope_theta and
    # rope_scaling, whose type key was "type" before "rope_type".
    rope = dict(config.get("rope_parameters") or {})
    rope.update(config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    try:
        out = dict(
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            num_key_value_heads=config.get("num_key_value_heads") or 0,
            head_dim=config.get("head_dim") or 0,
            vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            hidden_act=config.get("hidden_act", "silu"),
            bos_token_id=first_token_id(config.get("bos_token_id"), 1),
            eos_token_id=first_token_id(config.get("eos_token_id"), 2),
            eos_token_ids=tuple(int(t) for t in eos) if isinstance(eos := config.get("eos_token_id"), list) else (),
        )
    except KeyError as e:
        raise FlexGenError(f"{name}: config.json lacks {e.args[0]!r}") from None
    out["pad_token_id"] = first_token_id(config.get("pad_token_id"), out["eos_token_id"])
    return out


# ---------------------------------------------------------------------------------------
# Weight layout: every layer's tensors with their HF names (under "model.", stripped) and shapes.

def layer_specs(args: ModelArgs) -> list[LayerSpec]:
    """The streamed layers in execution order, with their weights."""
    h, f, v = args.hidden_size, args.intermediate_size, args.vocab_size
    E = WeightEntry

    def linear(field, name, out_dim, in_dim, bias):
        out = [E(f"{field}_weight", f"{name}.weight", (out_dim, in_dim), quantizable=True)]
        if bias:
            out.append(E(f"{field}_bias", f"{name}.bias", (out_dim,)))
        return out

    def norm(field, name):
        return [E(f"{field}_weight", f"{name}.weight", (h,), init="ones")]

    specs = [LayerSpec("input", -1, (E("embed_tokens", "embed_tokens.weight", (v, h)),), InputEmbedWeights)]
    for i in range(args.num_hidden_layers):
        pre = f"layers.{i}"
        attn = (norm("input_layernorm", f"{pre}.input_layernorm")
                + linear("q_proj", f"{pre}.self_attn.q_proj", args.q_width, h, args.qkv_bias)
                + linear("k_proj", f"{pre}.self_attn.k_proj", args.kv_width, h, args.qkv_bias)
                + linear("v_proj", f"{pre}.self_attn.v_proj", args.kv_width, h, args.qkv_bias)
                + linear("o_proj", f"{pre}.self_attn.o_proj", h, args.q_width, args.o_bias))
        mlp_ = (norm("post_attention_layernorm", f"{pre}.post_attention_layernorm")
                + linear("gate_proj", f"{pre}.mlp.gate_proj", f, h, args.mlp_bias)
                + linear("up_proj", f"{pre}.mlp.up_proj", f, h, args.mlp_bias)
                + linear("down_proj", f"{pre}.mlp.down_proj", h, f, args.mlp_bias))
        specs.append(LayerSpec("attention", i, tuple(attn), AttentionWeights))
        specs.append(LayerSpec("mlp", i, tuple(mlp_), MLPWeights))
    # A tied head is the input embedding; this layer keeps its own copy so that each layer
    # streams independently.
    head = "embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
    out = norm("norm", "norm") + [E("lm_head", head, (v, h))]
    specs.append(LayerSpec("output", -1, tuple(out), OutputEmbedWeights))
    return specs


@dataclass
class InputEmbedWeights:
    embed_tokens: torch.Tensor


@dataclass
class AttentionWeights:
    input_layernorm_weight: torch.Tensor
    q_proj_weight: torch.Tensor
    k_proj_weight: torch.Tensor
    v_proj_weight: torch.Tensor
    o_proj_weight: torch.Tensor
    q_proj_bias: Optional[torch.Tensor] = None
    k_proj_bias: Optional[torch.Tensor] = None
    v_proj_bias: Optional[torch.Tensor] = None
    o_proj_bias: Optional[torch.Tensor] = None


@dataclass
class MLPWeights:
    post_attention_layernorm_weight: torch.Tensor
    gate_proj_weight: torch.Tensor
    up_proj_weight: torch.Tensor
    down_proj_weight: torch.Tensor
    gate_proj_bias: Optional[torch.Tensor] = None
    up_proj_bias: Optional[torch.Tensor] = None
    down_proj_bias: Optional[torch.Tensor] = None


@dataclass
class OutputEmbedWeights:
    norm_weight: torch.Tensor
    lm_head: torch.Tensor


# ---------------------------------------------------------------------------------------
# Pure layer functions.

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32 as transformers does, then back to the compute dtype before the weight.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """Rotary frequencies (head_dim / 2,), with the config's rope scaling applied."""
    d = args.head_dim
    freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if args.rope_type == "linear":
        return freq / args.rope_factor
    if args.rope_type == "llama3":
        # Llama 3.1: low frequencies (long wavelengths) are divided by `factor`, high ones
        # kept, and the band between interpolated smoothly.
        lo, hi, old = args.rope_low_freq_factor, args.rope_high_freq_factor, args.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > old / lo, freq / args.rope_factor, freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / args.rope_factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    return freq


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, s, n, d); cos/sin (b, s, 1, d). The rotate-half convention of HF checkpoints."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def input_embed(w: InputEmbedWeights, input_ids: torch.Tensor, position_ids: torch.Tensor,
                args: Optional[ModelArgs] = None) -> torch.Tensor:
    """input_ids (b, s) -> hidden (b, s, h). Positions enter in attention (rotary)."""
    return F.embedding(input_ids, w.embed_tokens)


def self_attention(w: AttentionWeights, x: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                   kv: KVAccess, args: ModelArgs) -> torch.Tensor:
    """x (b, s, h); mask bool (b, s, t) over all cache slots attended to; position_ids (b, s)
    0-based positions of real tokens (padding's are unused). Returns (b, s, h)."""
    q, k, v = attention_in(w, x, position_ids, args)
    return attention_out(w, x, attention_core(q, k, v, mask, kv, args), args)


def attention_in(w: AttentionWeights, x: torch.Tensor, position_ids: torch.Tensor, args: ModelArgs):
    """The projections before attention, rotated: q (b, s, nh * d), k and v (b, s, nkv * d).
    Row-wise, so one call may cover several gpu batches."""
    b, s, _ = x.shape
    nh, nkv, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    x = rms_norm(x, w.input_layernorm_weight, args.rms_norm_eps)
    q = F.linear(x, w.q_proj_weight, w.q_proj_bias).view(b, s, nh, d)     # (b, s, nh, d)
    k = F.linear(x, w.k_proj_weight, w.k_proj_bias).view(b, s, nkv, d)    # (b, s, nkv, d)
    v = F.linear(x, w.v_proj_weight, w.v_proj_bias)                       # (b, s, nkv * d)
    angles = position_ids[..., None].float() * inv_freq(args, x.device)   # (b, s, d / 2), fp32
    angles = torch.cat((angles, angles), dim=-1)[:, :, None]              # (b, s, 1, d)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return _rotate(q, cos, sin).reshape(b, s, nh * d), _rotate(k, cos, sin).reshape(b, s, nkv * d), v


def attention_core(q, k, v, mask, kv: KVAccess, args: ModelArgs) -> torch.Tensor:
    """Attention of one gpu batch over its KV cache (k, v of this step appended)."""
    s, d = q.shape[1], args.head_dim
    if args.sliding_window and mask.shape[-1] > args.sliding_window:
        # Mistral: a query at cache slot p sees slots (p - window, p], as transformers counts them.
        t = mask.shape[-1]
        q_slot = torch.arange(t - s, t, device=mask.device)[:, None]     # (s, 1)
        mask = mask & (torch.arange(t, device=mask.device) > q_slot - args.sliding_window)
    # The kernel scales the scores, as transformers does: scaling q first rounds differently
    # in bf16, and greedy tokens of a random model then part ways.
    return attend_groups(q, kv.update(k, v), mask, args.num_attention_heads, args.num_key_value_heads,
                         scale=d ** -0.5)


def attention_out(w: AttentionWeights, x: torch.Tensor, attn: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The output projection and the residual (x: the layer's input). Row-wise."""
    return x + F.linear(attn, w.o_proj_weight, w.o_proj_bias)


def mlp(w: MLPWeights, x: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """SwiGLU: down(silu(gate(x)) * up(x)), with the temporaries updated in place."""
    h = rms_norm(x, w.post_attention_layernorm_weight, args.rms_norm_eps)
    g = F.silu(F.linear(h, w.gate_proj_weight, w.gate_proj_bias), inplace=True)
    g.mul_(F.linear(h, w.up_proj_weight, w.up_proj_bias))
    return x + F.linear(g, w.down_proj_weight, w.down_proj_bias)


def output_embed(w: OutputEmbedWeights, x: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Hidden of the last position (b, h) -> logits (b, vocab) in float32."""
    return F.linear(rms_norm(x, w.norm_weight, args.rms_norm_eps), w.lm_head).float()


def cost_figures(args: ModelArgs) -> CostFigures:
    h, f, q, kv = args.hidden_size, args.intermediate_size, args.q_width, args.kv_width
    # Peaks beyond the layer's input, as self_attention / mlp allocate (measured against the
    # engine in tests/test_memory_model.py). Attention: the normed input, q, k, v and three
    # q-wide tensors while rotating q (x * cos, cat * sin, their sum) or attending (q
    # regrouped, SDPA's output, its reshaped copy): h + 4q + 2kv; or at the residual add,
    # with the attention output, o_proj's and the sum: 3h + 2q + 2kv. MLP: the normed
    # input, gate and up (h + 2f); at the add, the product, down's output and the sum.
    return CostFigures(q_width=q, kv_width=kv, attn_temp_width=max(h + 4 * q, 3 * h + 2 * q) + 2 * kv,
                       mlp_temp_width=max(h + 2 * f, 3 * h + f),
                       query_groups=args.num_attention_heads // args.num_key_value_heads)
