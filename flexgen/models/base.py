"""What every model family shares: weight layout types, the KV-cache access protocol,
attention over row groups, and the figures the cost model asks a family for.

A family module (opt.py, llama.py, ...) provides, by these names:

    ModelArgs      frozen dataclass; from_config(config_dict, name), from_name(name),
                   to_hf_config(); fields/properties hidden_size, num_hidden_layers,
                   num_attention_heads, num_key_value_heads, head_dim, kv_width,
                   vocab_size, max_position_embeddings, pad/bos/eos_token_id
    SIZES          named sizes for --dummy and the optimizer
    MODEL_TYPES    the config.json model_type values it loads
    layer_specs(args) -> list[LayerSpec]          streamed layers with HF weight names
    input_embed(w, input_ids, position_ids, args) -> (b, s, h)
    self_attention(w, x, mask, position_ids, kv, args) -> (b, s, h), which is
      attention_out(w, x, attention_core(*attention_in(w, x, position_ids, args), mask, kv, args), args):
      attention_in (norm, projections: q, k, v) and attention_out (projection, residual)
      are row-wise, so decode runs them once over every gpu batch of the block and
      attention_core per gpu batch over its KV cache (scheduler.Scheduler._attention_merged)
    mlp(w, x, args) -> (b, s, h)
    output_embed(w, x, args) -> (b, vocab) float32
    cost_figures(args) -> CostFigures

The scheduler, KV cache, weight store and optimizer only use these; see registry.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

# Dummy-weight initialisation of a tensor: random normal * 0.02, ones (norm weights) or zeros.
INITS = ("normal", "ones", "zeros")


class ModelArgs(Protocol):
    """What code outside a family reads from any family's ModelArgs."""
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    @property
    def num_key_value_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def kv_width(self) -> int: ...


@dataclass(frozen=True)
class WeightEntry:
    field: str            # attribute of the layer's weight dataclass
    name: str             # Hugging Face parameter name, without the "model." prefix
    shape: tuple[int, ...]
    quantizable: Optional[bool] = None   # may be stored 4-bit; default: 2-D and not an embedding
    init: Optional[str] = None           # dummy init; default: 1-D zeros, else normal

    def __post_init__(self):
        if self.quantizable is None:
            object.__setattr__(self, "quantizable", len(self.shape) >= 2 and self.field not in UNQUANTIZED_FIELDS)
        if self.init is None:
            object.__setattr__(self, "init", "zeros" if len(self.shape) == 1 else "normal")
        assert self.init in INITS, self.init

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# Embeddings and the LM head stay 16-bit: grouped along dim 0 each 4-bit group mixes 64
# tokens, which cost +2.5 % perplexity alone in benchmarks/bench_quant_quality.py, for
# well under 1 % of a large model's bytes.
UNQUANTIZED_FIELDS = frozenset({"embed_tokens", "embed_positions", "lm_head"})


@dataclass(frozen=True)
class LayerSpec:
    kind: str                  # "input" | "attention" | "mlp" | "output"
    block: int                 # decoder block index, -1 for the embeddings
    entries: tuple[WeightEntry, ...]
    weights_cls: Optional[type] = dataclasses.field(default=None, compare=False)  # the layer's weight dataclass

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)


def build_weights(spec: LayerSpec, tensors: dict[str, torch.Tensor]):
    """The layer's weight dataclass from tensors keyed by field name."""
    cls = spec.weights_cls
    known = {f.name for f in dataclasses.fields(cls)}
    extra = set(tensors) - known
    if extra:
        raise KeyError(f"unexpected weights for a {spec.kind} layer: {sorted(extra)}")
    return cls(**tensors)


@dataclass(frozen=True)
class CostFigures:
    """Per-token widths (values, not bytes) the cost model needs beyond the weight layout.

    The matmul FLOPs and weight bytes come from layer_specs; these cover what the
    weights do not show: attention work, cache size and the layers' temporaries.
    """
    q_width: int            # num_attention_heads * head_dim: attention FLOPs are 4 * q_width per (query, key)
    kv_width: int           # values of K (and of V) per token per layer in the cache
    attn_temp_width: int    # values per row the attention layer holds at its peak beyond its input (output included)
    mlp_temp_width: int     # values per row the MLP holds at its peak beyond its input (output included)
    query_groups: int = 1   # query heads per K/V head: attention's mask is repeated this many times


# ---------------------------------------------------------------------------------------
# The KV cache as attention sees it.

@dataclass
class AttendGroup:
    """Rows of a gpu batch and the keys/values they attend over, on one device.

    keys/values are time-major (t, r, kv_width). `rows` indexes the batch. `attend`, when
    set, attends for these rows itself (the cache's host attention or packed cache:
    staging, dtype, workspace; keys/values are then None): attend(q_rows, mask_rows, fn)
    with fn(q, keys, values, mask) the layer's attention.
    """
    rows: slice
    keys: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
    attend: Optional[Callable] = None


class KVAccess(Protocol):
    """What an attention layer needs from the KV cache (see flexgen/kvcache.py)."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Sequence[AttendGroup]:
        """Store this step's k, v (b, s, kv_width); return what each row group attends over."""
        ...


def attend(q, keys, values, mask, num_heads: int, num_kv_heads: Optional[int] = None, scale: float = 1.0):
    """q (r, s, nh * d), to be scaled by `scale` (1: already scaled); keys/values time-major (t, r, nkv * d); mask bool
    (r, s, t), True = visible, or None when every key is visible (lets SDPA pick the flash
    kernel). Grouped-query attention when num_kv_heads < num_heads.

    Every query must see at least one key (the caller lets padding rows see themselves);
    a fully masked row would come out NaN.
    """
    nkv = num_kv_heads or num_heads
    r, s, hq = q.shape
    t = keys.shape[0]
    d = hq // num_heads
    kh = keys.view(t, r, nkv, d).permute(1, 2, 0, 3)             # (r, nkv, t, d), a view
    vh = values.view(t, r, nkv, d).permute(1, 2, 0, 3)
    m = None if mask is None else mask[:, None]                   # (r, 1, s, t)
    g = num_heads // nkv
    if g == 1:
        qh = q.view(r, s, num_heads, d).transpose(1, 2)          # (r, nh, s, d)
    else:
        # Grouped-query attention: the g query heads of each K/V head are stacked along the
        # query axis, so every fused kernel applies (SDPA's enable_gqa with a mask falls back
        # to the math kernel on CUDA, which materialises the scores) and K/V are never copied.
        # Query head i * g + j uses K/V head i, as transformers' repeat_kv.
        qh = q.view(r, s, nkv, g, d).permute(0, 2, 3, 1, 4).reshape(r, nkv, g * s, d)
        if m is not None:
            m = m[:, :, None].expand(r, 1, g, s, t).reshape(r, 1, g * s, t)
    # Fused attention never materialises the (r, nh, s, t) scores on CUDA (memory-efficient
    # kernel) and runs the flash kernel on CPU.
    # On the CPU, one bf16 query per head takes a slow path of the flash kernel (decode of
    # 32 rows x 32 heads over 160 positions: 37 ms against 7 ms with two queries, measured
    # on torch 2.13): attend with the query twice and keep one. fp32 has no such path.
    single = qh.device.type == "cpu" and qh.dtype != torch.float32 and qh.shape[2] == 1
    if single:
        qh = torch.cat((qh, qh), 2)
        m = None if m is None else m.expand(-1, -1, 2, -1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=m, scale=scale)
    if single:
        out = out[:, :, :1]
    if g == 1:
        return out.transpose(1, 2).reshape(r, s, hq)
    return out.view(r, nkv, g, s, d).permute(0, 3, 1, 2, 4).reshape(r, s, hq)


def attend_groups(q, groups: Sequence[AttendGroup], mask, num_heads: int, num_kv_heads: Optional[int] = None,
                  scale: float = 1.0):
    """Attention of q (b, s, nh * d) over every row group, each on the device that holds
    its keys (the host for rows whose cache stays there with cpu_cache_compute)."""
    if len(groups) == 1 and groups[0].attend is None and groups[0].keys.device == q.device:
        return attend(q, groups[0].keys, groups[0].values, mask, num_heads, num_kv_heads, scale)
    out = torch.empty_like(q)
    for g in groups:
        if g.attend is not None:
            out[g.rows] = g.attend(q[g.rows], None if mask is None else mask[g.rows],
                                   lambda q, k, v, m: attend(q, k, v, m, num_heads, num_kv_heads, scale))
            continue
        dev = g.keys.device
        m = None if mask is None else mask[g.rows].to(dev)
        o = attend(q[g.rows].to(dev), g.keys, g.values, m, num_heads, num_kv_heads, scale)
        out[g.rows] = o.to(q.device)
    return out


def first_token_id(value, default: Optional[int]) -> Optional[int]:
    """config.json token ids may be an int, a list (Llama 3.1's eos) or null."""
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)
