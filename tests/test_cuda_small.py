"""Smaller CUDA-path items that need no fake runtime: decode without a mask, chunked
prefill quantization, dequantization into the working buffer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import flexgen
from test_engine import P, hf_reference


def test_decode_attends_without_mask_when_no_row_is_padded(opt_dir, prompts, offload, monkeypatch):
    """A boolean mask rules out SDPA's flash kernel; decode of unpadded rows needs none."""
    path, model = opt_dir
    ids, mask = prompts
    calls = []
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[2], attn_mask is None))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    full = ids[[0, 4]]   # rows 0 and 4 have no padding
    ref, _ = hf_reference(model, full, torch.ones_like(full))
    with flexgen.load_model(str(path), P(50, 50, 50, 50), device="cpu", dtype=torch.float32,
                            offload_dir=offload) as m:
        out = m.generate(full, max_new_tokens=6, eos_token_id=[])
        assert torch.equal(out, ref)
        decode = [none for s, none in calls if s == 1]
        assert decode and all(decode)
        calls.clear()
        m.generate(ids[:2], mask[:2], max_new_tokens=3, eos_token_id=[])   # row 1 is padded
        assert not any(none for s, none in calls if s == 1)


def test_prefill_cache_quantized_in_chunks_matches_whole(opt_dir, prompts, offload, monkeypatch):
    from flexgen import kvcache
    path, _ = opt_dir
    ids, mask = prompts
    policy = P(100, 0, 30, 30, compress_cache=True)
    outs = []
    for chunk in (kvcache.QUANT_CHUNK_ELEMS, 64 * 2):   # whole, then two positions of one row at a time
        monkeypatch.setattr(kvcache, "QUANT_CHUNK_ELEMS", chunk)
        with flexgen.load_model(str(path), policy, device="cpu", dtype=torch.float32, offload_dir=offload) as m:
            outs.append(m.generate(ids, mask, max_new_tokens=4, eos_token_id=[], output_logits=True)[1])
    assert torch.equal(outs[0], outs[1])


def test_compressed_cache_dequantizes_into_the_working_buffer(opt_dir, prompts, offload, monkeypatch):
    from flexgen import quant
    path, _ = opt_dir
    ids, mask = prompts
    outs = []
    real = quant.dequantize

    def spy(p, dtype=None, out=None):
        outs.append(out is not None)
        return real(p, dtype, out=out)

    monkeypatch.setattr(quant, "dequantize", spy)
    with flexgen.load_model(str(path), P(cg=30, cc=30, compress_cache=True), device="cpu", dtype=torch.float32,
                            offload_dir=offload) as m:
        m.generate(ids, mask, max_new_tokens=3, eos_token_id=[])
    assert outs and all(outs)


def test_host_attention_buffers_growing_with_the_sequence_are_not_reallocated_every_step():
    """The mask and the fp32 workspace grow by one position per step; each reallocation
    of a page-locked buffer is a page-lock call on the compute thread."""
    from flexgen.device import ComputeDevice
    from flexgen.kvcache import HostAttention
    from flexgen.memory import MemoryTracker
    tracker = MemoryTracker()
    host = HostAttention(ComputeDevice("cpu"), tracker)
    ptrs = {host._buf("mask", (4096, 1, t), torch.bool, pin=True).data_ptr() for t in range(100, 164)}
    assert len(ptrs) <= 2
    host.close()
    assert tracker.current == MemoryTracker().current
