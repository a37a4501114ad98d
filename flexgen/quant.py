"""Group-wise asymmetric min/max quantization (4 or 8 bits) for weights and KV cache.

The format follows the original FlexGen: groups of `group_size` consecutive elements
along `group_dim`, one fp16 (scale, min) pair per group, values stored as unsigned
integers, two 4-bit values per byte. At 4 bits and group size 64 that is 4.5 bits per
value.

Packed layout. View the original tensor as (pre, L, post), where L = shape[group_dim],
pre = product of the dims before it and post = product of the dims after it. With
G = ceil(L / group_size) groups and P = G * group_size (L padded up):

    data:  shape[:d] + (P * num_bits // 8,) + shape[d+1:]   uint8
    scale: shape[:d] + (G,)                 + shape[d+1:]   float16
    mn:    shape[:d] + (G,)                 + shape[d+1:]   float16

Only the group dim changes size; every other dim keeps its size and order. So any
slice along a non-group dim of the original (a token of the KV cache, a batch row, a
weight column) is the same slice of data/scale/mn, and slices along the group dim
that start on a group boundary map to whole groups (see `Packed.narrow`). At 4 bits,
element 2i of the group dim sits in the low nibble of data byte i, element 2i + 1 in
the high nibble. Padding replicates the last real element, so it never widens a
group's range, and is stripped by `dequantize`.

Inputs must be finite with |x| <= 65504 (the fp16 range of scale and min).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexgen.errors import FlexGenError


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a tensor: bits per value, group size and the dim groups run along."""

    num_bits: int = 4
    group_size: int = 64
    group_dim: int = 0

    def __post_init__(self):
        if self.num_bits not in (4, 8) or isinstance(self.num_bits, bool):
            raise FlexGenError(f"quantization num_bits must be 4 or 8, got {self.num_bits!r}")
        gs = self.group_size
        if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1:
            raise FlexGenError(f"quantization group_size must be an integer >= 1, got {gs!r}")
        if self.num_bits == 4 and gs % 2:
            # Two values share a byte; an odd group would split a byte across groups.
            raise FlexGenError(f"4-bit quantization needs an even group_size, got {gs}")
        if not isinstance(self.group_dim, int) or isinstance(self.group_dim, bool):
            raise FlexGenError(f"quantization group_dim must be an integer, got {self.group_dim!r}")

    @property
    def qmax(self) -> int:
        return (1 << self.num_bits) - 1


# Weights (out, in): groups along the output channel, as the original FlexGen did.
WEIGHT_QUANT = QuantConfig(num_bits=4, group_size=64, group_dim=0)
# KV cache (t, b, h): groups along the hidden dim, so each token quantizes on its own.
CACHE_QUANT = QuantConfig(num_bits=4, group_size=64, group_dim=-1)


@dataclass
class Packed:
    """A quantized tensor: packed values, per-group fp16 scale and min, original shape.

    Layouts are in the module docstring. The three tensors live on one device.
    """

    data: torch.Tensor
    scale: torch.Tensor
    mn: torch.Tensor
    shape: tuple
    cfg: QuantConfig

    @property
    def nbytes(self) -> int:
        """Bytes held by data, scale and mn together."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.mn))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device, non_blocking: bool = False) -> "Packed":
        """The same packed tensor on `device` (no copy if already there)."""
        return Packed(self.data.to(device, non_blocking=non_blocking),
                      self.scale.to(device, non_blocking=non_blocking),
                      self.mn.to(device, non_blocking=non_blocking), self.shape, self.cfg)

    def pin_memory(self) -> "Packed":
        """A page-locked host copy, for asynchronous host-to-accelerator copies."""
        return Packed(self.data.pin_memory(), self.scale.pin_memory(), self.mn.pin_memory(),
                      self.shape, self.cfg)

    def narrow(self, dim: int, start: int, length: int) -> "Packed":
        """Views of rows [start, start + length) of original dim `dim`.

        Along the group dim, `start` must be a multiple of group_size and so must
        `length`, unless the slice runs to the end of the dim.
        """
        ndim = len(self.shape)
        dim = _norm_dim(dim, ndim)
        size = self.shape[dim]
        if start < 0 or length < 0 or start + length > size:
            raise ValueError(f"narrow({dim}, {start}, {length}) out of range for shape {self.shape}")
        new_shape = self.shape[:dim] + (length,) + self.shape[dim + 1:]
        if dim != _norm_dim(self.cfg.group_dim, ndim):
            return Packed(self.data.narrow(dim, start, length), self.scale.narrow(dim, start, length),
                          self.mn.narrow(dim, start, length), new_shape, self.cfg)
        gs = self.cfg.group_size
        if start % gs or (length % gs and start + length != size):
            raise ValueError(f"narrow along the group dim must align to group_size {gs}: "
                             f"start={start}, length={length}, size={size}")
        g0, ng = start // gs, -(-length // gs)
        bytes_per_group = gs * self.cfg.num_bits // 8
        return Packed(self.data.narrow(dim, g0 * bytes_per_group, ng * bytes_per_group),
                      self.scale.narrow(dim, g0, ng), self.mn.narrow(dim, g0, ng), new_shape, self.cfg)

    def copy_(self, src: "Packed", non_blocking: bool = False) -> "Packed":
        """Copy `src` (same shape and config, any device) into this one's buffers."""
        if tuple(src.shape) != tuple(self.shape) or src.cfg != self.cfg:
            raise ValueError(f"cannot copy packed {src.shape} {src.cfg} into {self.shape} {self.cfg}")
        self.data.copy_(src.data, non_blocking=non_blocking)
        self.scale.copy_(src.scale, non_blocking=non_blocking)
        self.mn.copy_(src.mn, non_blocking=non_blocking)
        return self


def _norm_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"group_dim {dim} out of range for a {ndim}-d tensor")
    return dim % ndim


def _split(shape, cfg: QuantConfig):
    """(d, pre, L, post, G, P) for `shape` viewed as (pre, L, post) around the group dim."""
    shape = tuple(shape)
    d = _norm_dim(cfg.group_dim, len(shape))
    L = shape[d]
    G = -(-L // cfg.group_size)
    return d, math.prod(shape[:d]), L, math.prod(shape[d + 1:]), G, G * cfg.group_size


def packed_shapes(shape, cfg: QuantConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{"data" | "scale" | "mn": (shape, dtype)} of the packed form of a tensor of `shape`."""
    shape = tuple(shape)
    d, _, _, _, G, P = _split(shape, cfg)
    return {"data": (shape[:d] + (P * cfg.num_bits // 8,) + shape[d + 1:], torch.uint8),
            "scale": (shape[:d] + (G,) + shape[d + 1:], torch.float16),
            "mn": (shape[:d] + (G,) + shape[d + 1:], torch.float16)}


def packed_nbytes(shape, cfg: QuantConfig) -> int:
    """Bytes of data + scale + mn for a tensor of `shape`."""
    return sum(math.prod(s) * torch.empty((), dtype=dt).element_size()
               for s, dt in packed_shapes(shape, cfg).values())


def empty_packed(shape, cfg: QuantConfig, device=None, pin_memory: bool = False) -> Packed:
    """Uninitialised packed buffers for a tensor of `shape`, to fill slice by slice."""
    bufs = {k: torch.empty(s, dtype=dt, device=device, pin_memory=pin_memory)
            for k, (s, dt) in packed_shapes(shape, cfg).items()}
    return Packed(bufs["data"], bufs["scale"], bufs["mn"], tuple(shape), cfg)


def _fp16_down(v: torch.Tensor) -> torch.Tensor:
    """The largest fp16 <= v (fp32 in), so a rounded group min stays below every value."""
    h = v.to(torch.float16)
    bits = h.view(torch.int16)
    # One fp16 ulp towards -inf is a step in the bit pattern: down for positives, up in
    # magnitude for negatives, and +0 goes to the smallest negative subnormal (0x8001).
    lower = torch.where(bits > 0, bits - 1, torch.where(bits == 0, -32767, bits + 1))
    return torch.where(h.float() > v, lower, bits).view(torch.float16)


def _fp16_up(v: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 >= v for v >= 0, so a rounded scale still spans the group."""
    h = v.to(torch.float16)
    bits = h.view(torch.int16)
    return torch.where(h.float() < v, bits + 1, bits).view(torch.float16)


def quantize(x: torch.Tensor, cfg: QuantConfig) -> Packed:
    """Quantize `x` (any float dtype, any device) group-wise; see the module docstring.

    Per element, |dequantize(quantize(x)) - x| <= scale / 2 of its group (plus fp32
    rounding): min is rounded down and scale up to fp16 before the values are
    quantized against them in fp32. A constant group gets scale 1 and q = 0, so it
    comes back as its min: exact when the value is an fp16 number.
    """
    shape = tuple(x.shape)
    d, pre, L, post, G, P = _split(shape, cfg)
    out = empty_packed(shape, cfg, device=x.device)
    if x.numel() == 0:
        return out
    gs = cfg.group_size
    nb = gs * cfg.num_bits // 8  # data bytes per group
    x3 = x.detach().reshape(pre, L, post)
    data = out.data.view(pre, G, nb, post)
    scale = out.scale.view(pre, G, 1, post)
    mn = out.mn.view(pre, G, 1, post)
    # Blocks of whole groups, as in `dequantize` (whole-tensor passes ran at ~0.2 Gelem/s on
    # this project's 2-core host).
    for r0, r1, g0, g1 in _group_blocks(pre, G, gs, post, x.device):
        l0, l1 = g0 * gs, min(g1 * gs, L)
        xg = torch.empty(r1 - r0, g1 - g0, gs, post, dtype=torch.float32, device=x.device)
        flat = xg.view(r1 - r0, (g1 - g0) * gs, post)
        flat[:, :l1 - l0] = x3[r0:r1, l0:l1]
        if l1 - l0 < flat.shape[1]:
            # Pad with the last real element: it never widens its group's range.
            flat[:, l1 - l0:] = x3[r0:r1, l1 - 1:l1]
        _quantize_block(xg, cfg, data[r0:r1, g0:g1], scale[r0:r1, g0:g1], mn[r0:r1, g0:g1])
    return out


def _quantize_block(xg: torch.Tensor, cfg: QuantConfig, data: torch.Tensor, scale: torch.Tensor,
                    mn: torch.Tensor) -> None:
    """Quantize fp32 groups xg (rows, groups, gs, post) into views of the packed buffers;
    xg is overwritten."""
    qmax = cfg.qmax
    # Two reductions: torch.aminmax is ~8x slower on the CPU (torch 2.13, one thread).
    lo, hi = xg.amin(2, keepdim=True), xg.amax(2, keepdim=True)  # (rows, groups, 1, post)
    mn16 = _fp16_down(lo)
    mn_f = mn16.float()
    step = (hi - mn_f) / qmax
    # max == min (and min exactly fp16) gives step 0; any positive scale then maps the
    # whole group to q = 0, which dequantizes to min exactly and never divides by zero.
    scale16 = _fp16_up(torch.where(step > 0, step, torch.ones_like(step)))
    mn.copy_(mn16)
    scale.copy_(scale16)
    q = xg.sub_(mn_f).div_(scale16.float()).round_().clamp_(0, qmax)
    if cfg.num_bits == 4:
        # Packed while still fp32 (low + 16 * high is exact there), then one conversion of
        # half the values: converting every value to uint8 and packing with shifts took
        # about twice as long on the CPU (the fp32 -> uint8 copy is not vectorized).
        pairs = q.view(*q.shape[:2], q.shape[2] // 2, 2, q.shape[3])
        data.copy_(torch.add(pairs[:, :, :, 0], pairs[:, :, :, 1], alpha=16))
    else:
        data.copy_(q)


# Elements dequantized per step. On the CPU a block of about 1 MiB of fp32 workspace per
# thread is ~2x faster than whole-tensor passes (its passes stay in cache) and than
# smaller blocks (per-op overhead): measured 1.3 Gelem/s on one thread, 2.4 on two.
# Elsewhere fewer, larger kernels win and the cap only bounds the fp32 workspace.
_CPU_CHUNK_ELEMS_PER_THREAD = 1 << 18
_DEFAULT_CHUNK_ELEMS = 1 << 24


def _chunk_elems(device: torch.device) -> int:
    if device.type == "cpu":
        return _CPU_CHUNK_ELEMS_PER_THREAD * torch.get_num_threads()
    return _DEFAULT_CHUNK_ELEMS


def _group_blocks(pre: int, G: int, gs: int, post: int, device: torch.device):
    """(r0, r1, g0, g1) blocks of the (pre, G groups, gs, post) view, each about one chunk:
    whole rows of groups, or part of one row; either way contiguous."""
    chunk = _chunk_elems(device)
    row = G * gs * post
    rows, groups = (max(1, chunk // row), G) if row <= chunk else (1, max(1, chunk // (gs * post)))
    for r0 in range(0, pre, rows):
        for g0 in range(0, G, groups):
            yield r0, min(r0 + rows, pre), g0, min(g0 + groups, G)


def dequantize(p: Packed, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor `p` encodes, in its original shape, as `dtype` (default float32).

    Computes in fp32 on p's device and rounds once to `dtype`. Pass `out` (shape
    p.shape, on p's device) to reuse a buffer: on the CPU a fresh large output costs
    more in page faults than the dequantization itself.
    """
    cfg = p.cfg
    if out is None:
        out = torch.empty(p.shape, dtype=dtype or torch.float32, device=p.data.device)
    elif tuple(out.shape) != tuple(p.shape) or (dtype is not None and out.dtype != dtype):
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, expected {tuple(p.shape)} {dtype}")
    if out.numel() == 0:
        return out
    _, pre, L, post, G, P = _split(p.shape, cfg)
    gs = cfg.group_size
    nb = gs * cfg.num_bits // 8  # data bytes per group
    data = p.data.reshape(pre, G, nb, post)
    scale = p.scale.reshape(pre, G, 1, post).float()
    mn = p.mn.reshape(pre, G, 1, post).float()
    work = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    out3 = work.view(pre, L, post)
    direct = out.dtype == torch.float32 and P == L  # unpack straight into the output
    for r0, r1, g0, g1 in _group_blocks(pre, G, gs, post, out.device):
        l0, l1 = g0 * gs, min(g1 * gs, L)
        if direct:
            ws = out3[r0:r1, l0:l1].view(r1 - r0, g1 - g0, gs, post)
        else:
            ws = torch.empty(r1 - r0, g1 - g0, gs, post, dtype=torch.float32, device=out.device)
        d = data[r0:r1, g0:g1]  # (rows, groups, nb, post)
        if cfg.num_bits == 4:
            pairs = ws.view(r1 - r0, g1 - g0, gs // 2, 2, post)
            pairs[:, :, :, 0] = d & 0x0F
            pairs[:, :, :, 1] = d >> 4
        else:
            ws.copy_(d)
        ws.mul_(scale[r0:r1, g0:g1]).add_(mn[r0:r1, g0:g1])
        if not direct:
            out3[r0:r1, l0:l1] = ws.view(r1 - r0, (g1 - g0) * gs, post)[:, :l1 - l0]
    if work is not out:
        out.copy_(work)
    return out


def fake_quantize(x: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """x rounded through the quantized format, in x's dtype: a reference for tests."""
    return dequantize(quantize(x, cfg), x.dtype)
