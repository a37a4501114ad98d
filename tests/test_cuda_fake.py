"""The CUDA branches, run on the CPU under a fake CUDA runtime (tests/fakecuda.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flexgen
from fakecuda import fake_cuda_fixture  # noqa: F401  (the fake_cuda fixture)
from test_engine import P

GEN = 4

POLICIES = {
    "all-gpu": P(),
    "weights-cpu": P(0, 100),
    "weights-disk": P(0, 0),
    "cache-cpu": P(cg=0, cc=100),
    "cache-disk": P(cg=0, cc=0),
    "act-cpu-disk": P(hg=0, hc=50),
    "mixed-ngb2": P(30, 30, 30, 30, 30, 30, num_gpu_batches=2),
    "no-overlap-disk": P(0, 0, 0, 0, 0, 0, overlap=False, num_gpu_batches=2),
    "cpu-cache-compute": P(50, 50, 25, 50, 100, 0, gpu_batch_size=4, cpu_cache_compute=True, num_gpu_batches=2),
    "cpu-cache-compute-disk": P(0, 0, 0, 50, cpu_cache_compute=True, num_gpu_batches=2),
    "compressed-mixed": P(30, 30, 30, 30, 30, 30, compress_weight=True, compress_cache=True, num_gpu_batches=2),
    "compressed-cpu-cache-compute": P(0, 50, 0, 50, 50, 50, compress_cache=True, cpu_cache_compute=True),
    "compressed-cpu-cache-compute-mixed": P(50, 50, 25, 50, 100, 0, gpu_batch_size=4, compress_cache=True,
                                            cpu_cache_compute=True, num_gpu_batches=2),
}


def generate(path, policy, ids, mask, offload, gen=GEN, logits=False):
    with flexgen.load_model(str(path), policy, device="cpu", dtype=torch.float32, offload_dir=offload) as m:
        out = m.generate(ids, mask, max_new_tokens=gen, eos_token_id=[], output_logits=logits)
        return out, m


@pytest.fixture(scope="module")
def cpu_tokens(opt_dir, prompts, tmp_path_factory):
    path, _ = opt_dir
    ids, mask = prompts
    return {name: generate(path, p, ids, mask, tmp_path_factory.mktemp("cpu"), logits=True)[0]
            for name, p in POLICIES.items()}


@pytest.mark.parametrize("name", list(POLICIES))
def test_cuda_branches_match_cpu_and_hand_offs_are_stream_safe(fake_cuda, opt_dir, prompts, offload, cpu_tokens,
                                                               name):
    path, _ = opt_dir
    ids, mask = prompts
    (out, logits), _ = generate(path, POLICIES[name], ids, mask, offload, logits=True)
    assert torch.equal(out, cpu_tokens[name][0])
    torch.testing.assert_close(logits, cpu_tokens[name][1], rtol=1e-5, atol=1e-5)
    assert fake_cuda.violations == []


def test_no_host_sync_on_the_compute_thread_when_nothing_is_copied(fake_cuda, opt_dir, prompts, offload):
    """All resident: the only host sync is the one that ends each token step (timing)."""
    path, _ = opt_dir
    ids, mask = prompts
    generate(path, P(gpu_batch_size=5), ids, mask, offload)
    assert len(fake_cuda.syncs) <= GEN, fake_cuda.syncs[:8]


def test_host_to_device_loads_do_not_block_io_threads(fake_cuda, opt_dir, prompts, offload):
    """Weights and hidden states streamed from host memory: the copies are ordered by an
    event the compute stream waits on, so no thread waits for the GPU per layer."""
    path, _ = opt_dir
    ids, mask = prompts
    generate(path, P(0, 100, hg=0, hc=100, gpu_batch_size=5), ids, mask, offload)
    loads = [s for t, s in fake_cuda.syncs if t != fake_cuda.compute_thread and "load" in t]
    assert loads == []
    on_compute = fake_cuda.syncs_on(fake_cuda.compute_thread)
    assert len(on_compute) <= GEN, on_compute[:8]
    # The compute stream waited for the loads on the GPU instead.
    assert any(e[0] == "wait_event" and e[2] == "compute" for e in fake_cuda.log)


def test_stores_and_loads_run_on_separate_workers(fake_cuda, opt_dir, prompts, offload):
    """A store that waits for its device-to-host copy must not hold up the next prefetch."""
    import threading

    from flexgen.iopool import IOPool
    names = {}
    real_submit = IOPool.submit

    def spy(self, fn, *args, **kw):
        def run(*a):
            names.setdefault(kw.get("store", False), set()).add(threading.current_thread().name)
            return fn(*a)
        return real_submit(self, run, *args, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(IOPool, "submit", spy)
    try:
        path, _ = opt_dir
        ids, mask = prompts
        generate(path, P(0, 100, hg=0, hc=100), ids, mask, offload)
    finally:
        mp.undo()
    assert set(names) == {False, True}
    assert not names[False] & names[True]


@pytest.mark.parametrize("name", ["weights-cpu", "cache-disk", "act-cpu-disk", "cpu-cache-compute",
                                  "compressed-mixed", "weights-disk"])
def test_pinned_reservation_close_to_request(fake_cuda, opt_dir, prompts, offload, name):
    path, _ = opt_dir
    ids, mask = prompts
    generate(path, POLICIES[name], ids, mask, offload)
    assert fake_cuda.pinned_requested_peak > 0
    assert fake_cuda.pinned_reserved_peak <= 1.1 * fake_cuda.pinned_requested_peak, fake_cuda.pinned_requests[:6]


@pytest.mark.parametrize("ccc", [True, False], ids=["host-attention", "copied-to-device"])
def test_host_kv_cache_is_not_pinned(fake_cuda, opt_dir, prompts, offload, ccc):
    """The host cache can be most of host memory: never page-locked (the original's choice)."""
    path, _ = opt_dir
    ids, mask = prompts
    with flexgen.load_model(str(path), P(100, 0, 0, 100, gpu_batch_size=5, cpu_cache_compute=ccc), device="cpu",
                            dtype=torch.float32, offload_dir=offload) as m:
        before = len(fake_cuda.pinned_requests)
        m.generate(ids, mask, max_new_tokens=GEN, eos_token_id=[])
        cache = m.stats.cache_bytes["cpu"]
    arrays = 2 * m.args.num_hidden_layers * 2    # K and V of each layer, one gpu batch
    assert cache > 0
    # Only small staging buffers are pinned, none the size of a cache array.
    assert all(req < cache // arrays for req, _, _ in fake_cuda.pinned_requests[before:])


@pytest.mark.parametrize("name", ["weights-cpu", "cache-disk", "act-cpu-disk", "weights-disk", "compressed-mixed",
                                  "cpu-cache-compute"])
def test_optimizer_host_memory_covers_pinned_reservation(fake_cuda, opt_dir, prompts, offload, name):
    """The cost model's host-memory prediction (CUDA profile) holds what is really pinned.

    Each pinned buffer is page-locked in whole pages: at this model's size (a few KiB per
    buffer) that is allowed for; at real sizes it is noise."""
    from fakecuda import PAGE
    from flexgen.optimizer import estimate, load_hardware
    path, _ = opt_dir
    ids, mask = prompts
    out, m = generate(path, POLICIES[name], ids, mask, offload)
    hw = dataclasses.replace(load_hardware("t4"), compute_dtype="float32")   # as the run
    est = estimate(m.args, POLICIES[name], ids.shape[1], GEN, hw)
    pages = PAGE * len(fake_cuda.pinned_requests)
    assert est.memory["cpu"] + pages >= fake_cuda.pinned_reserved_peak
    assert est.pinned_bytes + pages >= fake_cuda.pinned_reserved_peak


def test_host_attention_stages_once_and_attends_in_fp32(fake_cuda, opt_dir, prompts, offload, monkeypatch):
    """cpu_cache_compute on CUDA: per host group and layer one wait for the staged q, mask
    and new k/v (not four blocking transfers), and attention in fp32 even when the
    engine computes in a 16-bit dtype."""
    from flexgen.kvcache import HostAttention
    from flexgen.models import base
    seen = []
    real = base.attend

    def attend(q, keys, values, mask, num_heads, num_kv_heads=None, scale=1.0):
        seen.append((q.dtype, keys.dtype))
        return real(q, keys, values, mask, num_heads, num_kv_heads, scale)

    monkeypatch.setattr(base, "attend", attend)
    prepared = []
    real_prepare = HostAttention.prepare
    monkeypatch.setattr(HostAttention, "prepare", lambda self, *a: prepared.append(1) or real_prepare(self, *a))
    path, _ = opt_dir
    ids, mask = prompts
    policy = P(100, 0, 0, 50, gpu_batch_size=5, cpu_cache_compute=True)   # rows: cpu + disk groups
    steps = 12
    with flexgen.load_model(str(path), policy, device="cpu", dtype=torch.bfloat16, offload_dir=offload) as m:
        m.generate(ids, mask, max_new_tokens=steps, eos_token_id=[])
    host_groups = (steps - 1) * m.args.num_hidden_layers * 2
    assert len(prepared) == host_groups
    assert sum(1 for q, k in seen if q == k == torch.float32) == host_groups
    waits = [w for w in fake_cuda.syncs_on(fake_cuda.compute_thread) if w.startswith("event on compute")]
    assert len(waits) == host_groups


def test_io_threads_set_the_engine_device(fake_cuda, opt_dir, prompts, offload):
    """I/O threads start on device 0: with cuda:N their streams and allocations would land there."""
    import threading

    from flexgen.iopool import IOPool
    ran = set()
    real = IOPool.submit

    def spy(self, fn, *args, **kw):
        def run(*a):
            ran.add(threading.current_thread().name)
            return fn(*a)
        return real(self, run, *args, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(IOPool, "submit", spy)
    try:
        path, _ = opt_dir
        ids, mask = prompts
        generate(path, POLICIES["mixed-ngb2"], ids, mask, offload)
    finally:
        mp.undo()
    assert ran and ran <= fake_cuda.set_device_threads


def test_gpu_mem_caps_the_allocator_on_a_larger_card(fake_cuda, opt_dir, prompts, offload):
    path, _ = opt_dir
    ids, mask = prompts
    with flexgen.load_model(str(path), P(), device="cpu", dtype=torch.float32, offload_dir=offload,
                            gpu_mem=16 << 30) as m:
        m.generate(ids, mask, max_new_tokens=2, eos_token_id=[])
        assert m.stats.cuda_peak_reserved is not None
    assert fake_cuda.memory_fraction == pytest.approx(16 / 80)


def test_compute_time_is_measured_with_cuda_events(fake_cuda, opt_dir, prompts, offload):
    """Host time around a layer measures only its kernel launches."""
    path, _ = opt_dir
    ids, mask = prompts
    _, m = generate(path, P(gpu_batch_size=5), ids, mask, offload)
    layers = 2 * m.args.num_hidden_layers + 2
    assert fake_cuda.timing_events >= 2 * layers * GEN
    assert m.stats.timings["decode.compute"] > 0


FAMILY_POLICIES = ["weights-disk", "act-cpu-disk", "mixed-ngb2", "cpu-cache-compute-disk", "compressed-cpu-cache-compute"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from test_families import CHECKPOINTS, make_family_checkpoint
    out = {}
    for name in ("llama-gqa", "mistral-window"):
        family, overrides = CHECKPOINTS[name]
        d = tmp_path_factory.mktemp(name)
        make_family_checkpoint(d, family, seed=7, **overrides)
        out[name] = d
    return out


@pytest.mark.parametrize("family", ["llama-gqa", "mistral-window"])
def test_cuda_branches_of_other_families(fake_cuda, family_dirs, prompts, offload, tmp_path, family):
    """Grouped-query attention and a sliding window through the CUDA branches (host
    attention included): the same logits as the CPU branches, stream-safe hand-offs."""
    ids, mask = prompts
    for name in FAMILY_POLICIES:
        (out, logits), _ = generate(family_dirs[family], POLICIES[name], ids, mask, offload, logits=True)
        assert fake_cuda.violations == [], name
        with pytest.MonkeyPatch.context() as mp:   # the same run with the CPU branches
            from flexgen import device
            mp.setattr(device.ComputeDevice, "is_cuda", property(lambda self: False))
            (ref, ref_logits), _ = generate(family_dirs[family], POLICIES[name], ids, mask, tmp_path / name,
                                            logits=True)
        fake_cuda.violations.clear()   # the CPU branches hand off without streams, by design
        assert torch.equal(out, ref), name
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_host_weights_stay_page_locked_while_the_model_lives(fake_cuda, opt_dir, prompts, offload):
    """Every host weight part is inside a registered range for the model's whole life, and
    all of it is unregistered once the model is gone. (The host part is kept as a view of
    the registered buffer: a finalizer tied to the buffer's base tensor fired at once and
    left the weights pageable on a real GPU.)"""
    import gc
    path, _ = opt_dir
    ids, mask = prompts
    m = flexgen.load_model(str(path), P(0, 100, gpu_batch_size=5), device="cpu", dtype=torch.float32,
                           offload_dir=offload)
    try:
        m.generate(ids, mask, max_new_tokens=2, eos_token_id=[])
        gc.collect()
        live = [(k[1], req) for k, (req, _) in fake_cuda.pinned_live.items() if k[0] == "reg"]
        parts = [t for t in m.weights.cpu_parts if t is not None]
        assert parts
        for t in parts:
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            assert any(p <= lo and hi <= p + n for p, n in live), (lo, hi, live)
        assert m.device.pinned_bytes >= sum(t.numel() for t in parts)
    finally:
        m.close()
    del m, parts, t
    gc.collect()
    assert [k for k in fake_cuda.pinned_live if k[0] == "reg"] == []


def test_expandable_segments_are_asked_for_unless_the_user_configured_the_allocator():
    from flexgen.device import prefer_expandable_segments
    calls = []
    assert prefer_expandable_segments({}, calls.append) is True
    assert calls == ["expandable_segments:True"]
    for user in ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, {"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}):
        assert prefer_expandable_segments(dict(user), calls.append) is False
    assert len(calls) == 1                     # the user's setting stands
    env = {}                                   # a torch without the run-time setter: the variable
    assert prefer_expandable_segments(env, None) is True
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
