"""Group quantization: error bounds, packed sizes and layout, incremental KV-cache writes."""

import math
import zlib

import pytest
import torch

from flexgen import quant
from flexgen.errors import FlexGenError
from flexgen.quant import (CACHE_QUANT, WEIGHT_QUANT, Packed, QuantConfig, dequantize, empty_packed,
                           fake_quantize, packed_nbytes, packed_shapes, quantize)

SHAPES = [((130, 70), 0), ((130, 70), -1), ((3, 5, 97), -1), ((3, 5, 97), 0), ((3, 5, 97), 1),
          ((256, 128), 0), ((4, 2, 128), 2), ((50,), 0)]


def _tensor(kind, shape, gen):
    x = torch.randn(shape, generator=gen)
    if kind == "outliers":
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=gen)
        flat[idx] *= 1000.0
    elif kind == "shifted":  # narrow groups far from zero: min/max rounding to fp16 matters
        x = 300.0 + 0.01 * x
    return x


def _per_element(t, p):
    """Broadcast a per-group tensor (scale or mn) back to every element of the original."""
    d = p.cfg.group_dim % len(p.shape)
    return t.float().repeat_interleave(p.cfg.group_size, dim=d).narrow(d, 0, p.shape[d])


def _assert_within_half_step(y, x, p, extra=0.0):
    scale = _per_element(p.scale, p)
    err = (y.float() - x.float()).abs()
    # Half a step, plus fp32 rounding of mn + q * scale.
    bound = scale / 2 + 1e-6 * (x.float().abs() + scale) + extra
    assert torch.isfinite(y).all()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


def _group_ranges(x, p):
    """(min, max) of each group computed directly, in the packed scale's shape."""
    d = p.cfg.group_dim % x.dim()
    gs, L = p.cfg.group_size, x.shape[d]
    G = math.ceil(L / gs)
    los, his = [], []
    for g in range(G):  # a slow, obvious reference
        part = x.float().narrow(d, g * gs, min(gs, L - g * gs))
        los.append(part.amin(dim=d, keepdim=True))
        his.append(part.amax(dim=d, keepdim=True))
    return torch.cat(los, d), torch.cat(his, d)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,group_dim", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "outliers", "shifted"])
def test_roundtrip_within_half_step(bits, shape, group_dim, kind):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((bits, shape, group_dim, kind)).encode()))
    x = _tensor(kind, shape, gen)
    cfg = QuantConfig(bits, 64, group_dim)
    p = quantize(x, cfg)
    y = dequantize(p)
    assert y.shape == x.shape and y.dtype == torch.float32
    _assert_within_half_step(y, x, p)
    # The step must also be tight: no wider than the group's range needs (after
    # rounding min down and scale up to fp16), or the bound above would be vacuous.
    lo, hi = _group_ranges(x, p)
    mn, scale = p.mn.float(), p.scale.float()
    assert (mn <= lo).all() and (lo - mn <= lo.abs() * 2**-10 + 2**-24).all()
    tight = (hi - lo + lo.abs() * 2**-10 + 2**-24) / cfg.qmax * (1 + 2**-10 + 2**-20) + 2**-24
    varying = hi > lo
    assert (scale[varying] <= tight[varying]).all()


@pytest.mark.parametrize("group_size", [2, 6, 32, 128])
def test_other_group_sizes(group_size):
    x = torch.randn(37, 41, generator=torch.Generator().manual_seed(group_size))
    for dim in (0, 1):
        p = quantize(x, QuantConfig(4, group_size, dim))
        _assert_within_half_step(dequantize(p), x, p)


def test_odd_group_size_8bit():
    x = torch.randn(20, 33, generator=torch.Generator().manual_seed(1))
    p = quantize(x, QuantConfig(8, 7, -1))
    _assert_within_half_step(dequantize(p), x, p)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("value", [0.0, 1.5, -3.25, 1000.0, -65504.0, 2.0**-20])
def test_constant_fp16_values_are_exact(bits, value):
    for shape, dim in [((130, 70), 0), ((3, 5, 97), -1)]:
        x = torch.full(shape, value)
        p = quantize(x, QuantConfig(bits, 64, dim))
        y = dequantize(p)
        assert torch.isfinite(p.scale).all() and torch.isfinite(p.mn).all()
        assert (p.scale > 0).all()
        assert torch.equal(y, x)


@pytest.mark.parametrize("value", [0.1, -1e-3, 12345.678, 1e-9])
def test_constant_non_fp16_values_stay_finite(value):
    x = torch.full((64, 3), value)
    p = quantize(x, WEIGHT_QUANT)
    y = dequantize(p)
    assert torch.isfinite(y).all()
    _assert_within_half_step(y, x, p)
    # No worse than storing the value itself in fp16.
    assert ((y - x).abs() <= abs(value) * 2**-11 + 2**-24).all()


def test_constant_groups_inside_varying_tensor():
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(3))
    x[:64, 2] = 0.75  # one constant group along dim 0
    p = quantize(x, WEIGHT_QUANT)
    y = dequantize(p)
    assert torch.equal(y[:64, 2], x[:64, 2])
    _assert_within_half_step(y, x, p)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,group_dim", SHAPES)
def test_packed_sizes(bits, shape, group_dim):
    cfg = QuantConfig(bits, 64, group_dim)
    x = torch.randn(shape)
    p = quantize(x, cfg)
    d = group_dim % len(shape)
    groups = math.ceil(shape[d] / 64)
    others = math.prod(shape) // shape[d]
    assert p.data.dtype == torch.uint8 and p.scale.dtype == torch.float16 and p.mn.dtype == torch.float16
    assert p.data.numel() == groups * 64 * others * bits // 8
    assert p.scale.numel() == p.mn.numel() == groups * others
    # Every non-group dim is kept in place; only the group dim changes size.
    for t, size in ((p.data, groups * 64 * bits // 8), (p.scale, groups), (p.mn, groups)):
        assert t.shape == shape[:d] + (size,) + shape[d + 1:]
    shapes = packed_shapes(shape, cfg)
    for name in ("data", "scale", "mn"):
        t = getattr(p, name)
        assert shapes[name] == (tuple(t.shape), t.dtype)
    assert packed_nbytes(shape, cfg) == p.nbytes == (p.data.numel() + 2 * (p.scale.numel() + p.mn.numel()))
    assert p.shape == shape


def test_bits_per_value_at_4_bits_group_64():
    shape = (8192, 256)
    assert packed_nbytes(shape, WEIGHT_QUANT) * 8 / math.prod(shape) == 4.5
    assert packed_nbytes((16, 4, 1024), CACHE_QUANT) * 8 / (16 * 4 * 1024) == 4.5


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,group_dim", [((130, 70), 0), ((3, 5, 97), -1), ((3, 5, 97), 1)])
def test_documented_layout(bits, shape, group_dim):
    """Decode data by hand (low nibble = even element) and compare with dequantize."""
    cfg = QuantConfig(bits, 64, group_dim)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    p = quantize(x, cfg)
    d = group_dim % len(shape)
    if bits == 4:
        low, high = (p.data & 15).long(), (p.data >> 4).long()
        q = torch.stack([low, high], dim=d + 1).flatten(d, d + 1)  # interleave along dim d
    else:
        q = p.data.long()
    q = q.narrow(d, 0, shape[d]).float()
    expected = _per_element(p.mn, p) + q * _per_element(p.scale, p)
    torch.testing.assert_close(dequantize(p), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("h", [128, 100])
def test_cache_grows_one_token_at_a_time(h):
    T, b = 9, 3
    x = torch.randn(T, b, h, generator=torch.Generator().manual_seed(h))
    whole = quantize(x, CACHE_QUANT)
    steps = [quantize(x[t:t + 1], CACHE_QUANT) for t in range(T)]
    for name in ("data", "scale", "mn"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(s, name) for s in steps], 0))
    # The engine's way: preallocate, then write each token's packed rows in place.
    cache = empty_packed((T, b, h), CACHE_QUANT)
    for t, s in enumerate(steps):
        cache.narrow(0, t, 1).copy_(s)
    for name in ("data", "scale", "mn"):
        assert torch.equal(getattr(cache, name), getattr(whole, name))
    # A prefix of the cache decodes to the prefix of the tensor.
    assert torch.equal(dequantize(cache.narrow(0, 0, 4)), dequantize(whole)[:4])


def test_cache_batch_rows_slice():
    x = torch.randn(6, 8, 192, generator=torch.Generator().manual_seed(2))
    whole = quantize(x, CACHE_QUANT)
    part = whole.narrow(1, 2, 5)
    ref = quantize(x[:, 2:7], CACHE_QUANT)
    for name in ("data", "scale", "mn"):
        assert torch.equal(getattr(part, name), getattr(ref, name))
    assert torch.equal(dequantize(part), dequantize(whole)[:, 2:7])


def test_weight_rows_slice_on_group_boundaries():
    x = torch.randn(130, 70, generator=torch.Generator().manual_seed(4))
    whole = quantize(x, WEIGHT_QUANT)
    for start, length in [(0, 64), (64, 66), (0, 130), (128, 2)]:
        part = whole.narrow(0, start, length)
        ref = quantize(x[start:start + length], WEIGHT_QUANT)
        for name in ("data", "scale", "mn"):
            assert torch.equal(getattr(part, name), getattr(ref, name))
        assert torch.equal(dequantize(part), dequantize(whole)[start:start + length])
    # Columns are a non-group dim: any slice works.
    assert torch.equal(dequantize(whole.narrow(1, 3, 17)), dequantize(whole)[:, 3:20])
    for start, length in [(10, 64), (0, 65), (64, 1)]:
        with pytest.raises(ValueError):
            whole.narrow(0, start, length)


@pytest.mark.parametrize("shape,cfg", [((130, 70), WEIGHT_QUANT), ((7, 3, 100), CACHE_QUANT)])
def test_bf16_input_and_output(shape, cfg):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6)).bfloat16()
    p = quantize(x, cfg)
    y32 = dequantize(p)
    _assert_within_half_step(y32, x, p)
    y16 = dequantize(p, torch.bfloat16)
    assert y16.dtype == torch.bfloat16 and y16.shape == x.shape
    # fp32 result rounded once to bf16.
    assert torch.equal(y16, y32.bfloat16())
    _assert_within_half_step(y16, x, p, extra=x.float().abs() * 2**-8)
    f = fake_quantize(x, cfg)
    assert f.dtype == torch.bfloat16 and torch.equal(f, y16)


@pytest.mark.parametrize("chunk", [1, 100, 3000, 1 << 18])
@pytest.mark.parametrize("shape,group_dim", [((130, 70), 0), ((33, 4, 97), -1), ((256, 64), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_blocking_does_not_change_result(monkeypatch, chunk, shape, group_dim, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    p = quantize(x, QuantConfig(4, 64, group_dim))
    expected = (_per_element(p.mn, p) + _decode_q(p) * _per_element(p.scale, p)).to(dtype)
    monkeypatch.setattr(quant, "_CPU_CHUNK_ELEMS_PER_THREAD", chunk)
    assert torch.equal(dequantize(p, dtype), expected)


@pytest.mark.parametrize("chunk", [1, 100, 3000])
@pytest.mark.parametrize("shape,group_dim,bits", [((130, 70), 0, 4), ((33, 4, 97), -1, 4), ((5, 200, 3), 1, 8)])
def test_quantize_blocking_does_not_change_result(monkeypatch, chunk, shape, group_dim, bits):
    """Small blocks (part of a row, a padded last block) pack exactly what one block does."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(11)).bfloat16()
    cfg = QuantConfig(bits, 64, group_dim)
    monkeypatch.setattr(quant, "_CPU_CHUNK_ELEMS_PER_THREAD", 1 << 24)
    whole = quantize(x, cfg)
    monkeypatch.setattr(quant, "_CPU_CHUNK_ELEMS_PER_THREAD", chunk)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)   # the chunk is per thread
    blocked = quantize(x, cfg)
    for name in ("data", "scale", "mn"):
        assert torch.equal(getattr(blocked, name), getattr(whole, name)), name


def _decode_q(p):
    d = p.cfg.group_dim % len(p.shape)
    q = torch.stack([p.data & 15, p.data >> 4], dim=d + 1).flatten(d, d + 1)
    return q.narrow(d, 0, p.shape[d]).float()


def test_dequantize_into_out():
    x = torch.randn(70, 130, generator=torch.Generator().manual_seed(8))
    p = quantize(x, WEIGHT_QUANT)
    out = torch.empty(70, 130, dtype=torch.bfloat16)
    assert dequantize(p, out=out) is out
    assert torch.equal(out, dequantize(p, torch.bfloat16))
    strided = torch.empty(130, 70).t()  # non-contiguous
    assert dequantize(p, out=strided) is strided
    assert torch.equal(strided, dequantize(p))
    with pytest.raises(ValueError):
        dequantize(p, out=torch.empty(70, 129))
    with pytest.raises(ValueError):
        dequantize(p, torch.float32, out=out)


def test_quantize_leaves_input_untouched():
    x = torch.randn(64, 10)
    before = x.clone()
    quantize(x, WEIGHT_QUANT)
    assert torch.equal(x, before)


def test_empty_tensor():
    p = quantize(torch.empty(0, 2, 64), CACHE_QUANT)
    assert p.data.shape == (0, 2, 32) and dequantize(p).shape == (0, 2, 64)


def test_packed_to_and_nbytes():
    x = torch.randn(128, 16)
    p = quantize(x, WEIGHT_QUANT)
    q = p.to("cpu")
    assert isinstance(q, Packed) and q.shape == p.shape and q.nbytes == p.nbytes == 128 * 16 // 2 + 2 * 2 * 2 * 16
    assert torch.equal(dequantize(q), dequantize(p))


@pytest.mark.parametrize("kwargs", [dict(num_bits=3), dict(num_bits=16), dict(group_size=0),
                                    dict(group_size=63), dict(group_size=2.0), dict(group_dim=1.0)])
def test_invalid_config(kwargs):
    with pytest.raises(FlexGenError):
        QuantConfig(**kwargs)


def test_group_dim_out_of_range():
    with pytest.raises(ValueError):
        quantize(torch.randn(4, 4), QuantConfig(4, 64, 2))
    with pytest.raises(ValueError):
        packed_shapes((4, 4), QuantConfig(4, 64, -3))


def test_module_configs():
    assert (WEIGHT_QUANT.num_bits, WEIGHT_QUANT.group_size, WEIGHT_QUANT.group_dim) == (4, 64, 0)
    assert (CACHE_QUANT.num_bits, CACHE_QUANT.group_size, CACHE_QUANT.group_dim) == (4, 64, -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_roundtrip_and_transfer():
    x = torch.randn(3, 4, 200, device="cuda")
    p = quantize(x, CACHE_QUANT)
    assert p.device.type == "cuda"
    y = dequantize(p, torch.float16)
    _assert_within_half_step(y, x, p, extra=x.float().abs() * 2**-11)
    h = p.to("cpu")
    assert torch.equal(dequantize(h), dequantize(p).cpu())
    back = h.pin_memory().to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back.data, p.data)
