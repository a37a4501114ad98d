"""4-bit weights and KV cache in the engine, against fake-quantized transformers references.

Random networks are chaotic (4-bit noise changes most argmaxes), so the references are
the same HF model with weights replaced by dequantize(quantize(W)), and with every K/V
position passed through quantize -> dequantize once it is stored in the cache.
"""

from __future__ import annotations

import copy

import pytest
import torch

import flexgen
from flexgen import Policy
from flexgen.quant import CACHE_QUANT, WEIGHT_QUANT, fake_quantize

GEN = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import make_checkpoint
    d = tmp_path_factory.mktemp("opt-q")
    # hidden 128 = two cache groups per position; ffn 256
    model = make_checkpoint(d, tokenizer=False, hidden_size=128, ffn_dim=256, num_attention_heads=4, seed=5)
    return d, model


def fake_quant_weights(model):
    """Every >= 2-D weight but the embeddings (and the LM head tied to them) fake-quantized."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() >= 2 and "embed_" not in name and "lm_head" not in name:
                p.copy_(fake_quantize(p, WEIGHT_QUANT))
    return ref


def _fq_cache_positions(cache, t0, t1):
    for layer in cache.layers:
        for name in ("keys", "values"):
            x = getattr(layer, name)                       # (b, nh, t, d)
            b, nh, _, d = x.shape
            part = x[:, :, t0:t1].permute(2, 0, 1, 3).reshape(t1 - t0, b, nh * d)  # time-major (t, b, h)
            fq = fake_quantize(part, CACHE_QUANT).reshape(t1 - t0, b, nh, d).permute(1, 2, 0, 3)
            x[:, :, t0:t1] = fq


def hf_reference(model, ids, mask, gen=GEN, quant_cache=False):
    """Greedy decoding step by step; optionally fake-quantize each position once cached."""
    from transformers import DynamicCache
    cache, am = DynamicCache(), mask.clone()
    seqs, all_logits = ids.clone(), []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, past_key_values=cache, use_cache=True)
        if quant_cache:
            _fq_cache_positions(cache, 0, ids.shape[1])
        for step in range(gen):
            logits = out.logits[:, -1].float()
            all_logits.append(logits)
            tok = logits.argmax(-1, keepdim=True)
            seqs = torch.cat([seqs, tok], 1)
            if step == gen - 1:
                break
            am = torch.cat([am, torch.ones_like(tok)], 1)
            t = cache.get_seq_length()
            out = model(input_ids=tok, attention_mask=am, past_key_values=cache, use_cache=True)
            if quant_cache:
                _fq_cache_positions(cache, t, t + 1)
    return seqs, torch.stack(all_logits, 1)


def run(path, policy, ids, mask, offload):
    with flexgen.load_model(str(path), policy, device="cpu", dtype=torch.float32, offload_dir=offload) as m:
        return m.generate(ids, mask, max_new_tokens=GEN, eos_token_id=[], output_logits=True)


def pol(pct=(100, 0, 100, 0, 100, 0), **kw):
    kw.setdefault("gpu_batch_size", 2)
    return Policy.from_percent(pct, **kw)


PLACEMENTS = {
    "gpu": pol(),
    "cpu": pol((0, 100, 0, 100, 0, 100)),
    "disk": pol((0, 0, 0, 0, 0, 0)),
    "mixed-ngb2": pol((30, 30, 30, 30, 30, 30), num_gpu_batches=2),
    "mixed-ccc": pol((20, 40, 25, 50, 100, 0), gpu_batch_size=4, num_gpu_batches=2, cpu_cache_compute=True),
    "disk-ngb3-seq": pol((0, 0, 0, 0, 0, 0), gpu_batch_size=1, num_gpu_batches=3, overlap=False),
}


@pytest.mark.parametrize("flags", [dict(compress_weight=True), dict(compress_cache=True),
                                   dict(compress_weight=True, compress_cache=True)], ids=lambda f: "+".join(f))
def test_matches_fake_quantized_reference(ckpt, prompts, tmp_path, flags):
    path, model = ckpt
    ids, mask = prompts
    ref_model = fake_quant_weights(model) if flags.get("compress_weight") else model
    ref_seq, ref_logits = hf_reference(ref_model, ids, mask, quant_cache=flags.get("compress_cache", False))
    for name, p in PLACEMENTS.items():
        p = Policy(**{**p.to_dict(), **flags})
        seq, logits = run(path, p, ids, mask, tmp_path / name)
        assert torch.equal(seq, ref_seq), name
        torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3, msg=name)


def test_compression_changes_results(ckpt, prompts, tmp_path):
    """Guards the references above: the fake-quantized model really differs from the original."""
    path, model = ckpt
    ids, mask = prompts
    full = run(path, pol(), ids, mask, tmp_path / "a")[1]
    comp = run(path, pol(compress_weight=True, compress_cache=True), ids, mask, tmp_path / "b")[1]
    assert (full - comp).abs().max() > 1e-3


def test_compressed_store_size(tmp_path):
    """4-bit store files are within 5 % of 4.5/16 of the 16-bit store, embeddings excluded
    (they stay 16-bit, as do 1-D norms and biases, which are counted)."""
    from conftest import make_checkpoint
    from flexgen.models.base import UNQUANTIZED_FIELDS
    path = tmp_path / "ckpt"
    make_checkpoint(path, tokenizer=False, hidden_size=512, ffn_dim=2048, num_attention_heads=8, layers=2)
    sizes = {}
    for flag in (False, True):
        with flexgen.load_model(str(path), pol(compress_weight=flag), device="cpu", dtype=torch.bfloat16,
                                offload_dir=tmp_path / "off") as m:
            files = sum(f.stat().st_size for f in m.store_dir.glob("layer_*.bin"))
            embed = sum(2 * e.numel for lay in m.weights.layouts for e in lay.spec.entries
                        if e.field in UNQUANTIZED_FIELDS)
            sizes[flag] = files - embed
    ratio = sizes[True] / sizes[False]
    assert abs(ratio / (4.5 / 16) - 1) < 0.05, ratio


def test_compressed_cache_bytes(ckpt, prompts, tmp_path):
    path, _ = ckpt
    ids, mask = prompts
    held = {}
    for flag in (False, True):
        with flexgen.load_model(str(path), pol((100, 0, 0, 0, 100, 0), compress_cache=flag), device="cpu",
                                dtype=torch.float32, offload_dir=tmp_path) as m:
            m.generate(ids, mask, max_new_tokens=2, eos_token_id=[])
            held[flag] = m.stats.cache_bytes["disk"]
    # fp32 compute here: 4.5 bits against 32 per value
    assert abs(held[True] / held[False] - 4.5 / 32) < 0.01, held


@pytest.mark.parametrize("ccc", [False, True], ids=["device", "host-attention"])
@pytest.mark.parametrize("tile", [1 << 22, 128 * 8], ids=["one-tile", "row-tiles"])
def test_cpu_cache_read_stays_packed_until_compute(tmp_path, monkeypatch, ccc, tile):
    """On a CPU device a 4-bit cache read (I/O thread) only reads: the compute thread's
    attention dequantizes, a tile of rows at a time (the I/O thread goes on to its next
    read). What attention sees is exactly the dequantized stored cache, in fp32, with this
    step's k/v appended, and its output is the attention over all of it."""
    from flexgen import kvcache
    from flexgen.device import ComputeDevice
    from flexgen.kvcache import KVCache
    from flexgen.memory import MemoryTracker
    from flexgen.models.base import attend, attend_groups
    from flexgen.placement import RowSplit
    from flexgen.quant import CACHE_QUANT, fake_quantize
    monkeypatch.setattr(kvcache, "PACKED_TILE_ELEMS", tile)   # row-tiles: one row of 8 positions
    g = torch.Generator().manual_seed(3)
    rows, hidden, t, heads = 4, 128, 7, 2
    tracker = MemoryTracker()
    cache = KVCache(1, 1, RowSplit(0, 1, 3), t + 2, hidden, torch.float32, ComputeDevice("cpu"),
                    tracker, tmp_path, compress=True, cpu_cache_compute=ccc)
    try:
        slot = cache.slot(0, 0)
        k, v = torch.randn(rows, t, hidden, generator=g), torch.randn(rows, t, hidden, generator=g)
        work = slot.begin(0, t)
        work.update(k, v)
        slot.end(work)
        work = slot.begin(t, 1)
        assert [grp.packed is not None for grp in work.groups] == [True, True]   # cpu part, disk part
        assert all(grp.k is None and grp.v is None for grp in work.groups)     # no working copies
        # The host part is dequantized from its own storage, not from a copy of it.
        host_part, disk_part = (grp.parts[0] for grp in work.groups)
        for grp, part in zip(work.groups, (host_part, disk_part)):
            for packed, arr in zip(grp.packed, (part.k, part.v)):
                own = part.tier.name != "DISK" and all(
                    getattr(packed, n).data_ptr() == arr.parts[n].data.data_ptr() for n in ("data", "scale", "mn"))
                assert own == (part is host_part)
        disk_packed = sorted(getattr(p, n).data_ptr() for p in work.groups[1].packed for n in ("data", "scale", "mn"))
        nk, nv = torch.randn(rows, 1, hidden, generator=g), torch.randn(rows, 1, hidden, generator=g)
        q = torch.randn(rows, 1, hidden, generator=g)
        groups = work.update(nk, nv)
        seen = []

        def fn(q, keys, values, mask):
            seen.append((keys.clone(), values.clone()))
            assert keys.dtype == values.dtype == torch.float32 and keys.shape[:2] == (t + 1, q.shape[0])
            return attend(q, keys, values, mask, heads)
        got = torch.empty_like(q)
        for grp in groups:
            got[grp.rows] = grp.attend(q[grp.rows], None, fn)
        assert len(seen) == (rows if tile < 1 << 22 else 2)
        keys = torch.cat([kk for kk, _ in seen], dim=1)        # (t + 1, rows, h)
        values = torch.cat([vv for _, vv in seen], dim=1)
        want_k = torch.cat([fake_quantize(k.transpose(0, 1), CACHE_QUANT), nk.transpose(0, 1)])
        want_v = torch.cat([fake_quantize(v.transpose(0, 1), CACHE_QUANT), nv.transpose(0, 1)])
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
        assert torch.allclose(got, attend(q, want_k, want_v, None, heads), atol=1e-6)
        slot.end(work)
        # The next step reads into the same memory (no fresh pages to fault in).
        held = dict(tracker.current)
        again = slot.begin(t + 1, 1)
        assert sorted(getattr(p, n).data_ptr() for p in again.groups[1].packed
                      for n in ("data", "scale", "mn")) == disk_packed
        assert tracker.current == held
        out = attend_groups(q, again.update(nk, nv), None, heads)
        assert out.shape == q.shape and torch.isfinite(out).all()
        slot.end(again)
        assert tracker.current == held   # the workspace is kept, not grown
    finally:
        cache.close()
    assert not list(tmp_path.glob("kv_layer_*"))
    assert all(n == 0 for n in tracker.current.values())
