"""Policy optimizer: hardware profiles, cost model, the linear program, the CLI.

Fast: every program is a few milliseconds of CBC; the T4 checks search six settings.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from flexgen.calibrate import profile_main
from flexgen.errors import FlexGenError
from flexgen.models.opt import ModelArgs
from flexgen.optimizer import (DEFAULT_ENGINE, GIB, Budgets, HardwareProfile, default_profile_path, estimate,
                               fractions_of, load_hardware, original_weight_split, search)
from flexgen.optimizer.cli import policy_main
from flexgen.optimizer.cost_model import BlockModel, evaluate, layer_costs
from flexgen.optimizer.hardware import DISK_PROBE
from flexgen.optimizer.report import format_estimate
from flexgen.optimizer.solver import _solve, build_lp, check_budgets, solve_block
from flexgen.policy import Policy

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
sys.path.insert(0, str(ROOT / "benchmarks"))
from paper_t4 import GEN_LEN, PAPER_BUDGETS_GIB, PAPER_T4_ROWS, PROMPT_LEN, reference_file  # noqa: E402


def toy_hw(**kw) -> HardwareProfile:
    """A fixed, made-up CUDA machine: the tests must not depend on the bundled numbers."""
    base = dict(name="toy", device="toy gpu", compute_device="cuda", compute_dtype="float16",
                gpu_mem=8 * GIB, cpu_mem=32 * GIB, disk_mem=200 * GIB, gpu_reserved=0, cpu_reserved=0,
                cpu_to_gpu_bw=10e9, gpu_to_cpu_bw=10e9, disk_read_bw=2e9, disk_write_bw=1e9,
                gpu_matmul_flops=50e12, gpu_mem_bw=500e9, gpu_attn_flops_prefill=20e12,
                gpu_attn_flops_decode=0.2e12, gpu_dequant_rate=20e9, cpu_matmul_flops=1e12,
                cpu_attn_flops=0.05e12, cpu_dequant_rate=2e9, layer_overhead=1e-5)
    base.update(kw)
    return HardwareProfile(**base)


def policy(pct, gbs=4, ngb=1, **kw) -> Policy:
    return Policy.from_percent(pct, gpu_batch_size=gbs, num_gpu_batches=ngb, **kw)


OPT_1_3B = ModelArgs.from_name("opt-1.3b")
OPT_125M = ModelArgs.from_name("opt-125m")


# ---------------------------------------------------------------------------------------
# Hardware profiles.

def test_profile_json_round_trip(tmp_path):
    for hw in (load_hardware("t4"), toy_hw(unified_memory=True, compute_device="cpu", compute_dtype="bfloat16",
                                           notes="x")):
        path = hw.save(tmp_path / "sub" / "hw.json")
        assert HardwareProfile.load(path) == hw
        assert load_hardware(str(path)) == hw
        assert HardwareProfile.from_dict(json.loads(path.read_text())) == hw


@pytest.mark.parametrize("change, match", [
    (dict(disk_read_bw=-1.0), "disk_read_bw"),
    (dict(gpu_matmul_flops=0), "gpu_matmul_flops"),
    (dict(compute_dtype="float8"), "compute_dtype"),
    (dict(compute_device="tpu"), "compute_device"),
    (dict(gpu_reserved=-5), "gpu_reserved"),
    (dict(gpu_quant_rate=-1.0), "gpu_quant_rate"),
    (dict(disk_probe=-1), "disk_probe"),
    (dict(cpu_to_gpu_bw=float("nan")), "cpu_to_gpu_bw"),
])
def test_profile_validation(change, match):
    with pytest.raises(FlexGenError, match=match):
        toy_hw(**change)


def test_profile_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FlexGenError, match="cannot read"):
        HardwareProfile.load(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(toy_hw().to_dict() | {"gpu_tflops": 3}))
    with pytest.raises(FlexGenError, match="unknown field"):
        HardwareProfile.load(unknown)
    with pytest.raises(FlexGenError, match="not found"):
        HardwareProfile.load(tmp_path / "missing.json")
    with pytest.raises(FlexGenError, match="unknown hardware profile"):
        load_hardware("h100-imaginary")


def test_default_profile_path_and_missing_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_profile_path() == tmp_path / "flexgen" / "hardware.json"
    with pytest.raises(FlexGenError, match="flexgen profile"):
        load_hardware(None)
    toy_hw().save(default_profile_path())
    assert load_hardware(None) == toy_hw()


def test_cached_profile_from_an_older_disk_probe_gets_its_disk_remeasured(tmp_path, monkeypatch):
    """The automatic policy's cached profile: disk figures from the older probe (which
    read too fast) are measured again, and a missing 4-bit host attention rate measured,
    and saved, the rest of the profile kept; a complete profile is used as it is."""
    from flexgen import autopolicy, calibrate
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(calibrate, "disk_bandwidth",
                        lambda d, *a, **kw: calls.append(d) or (0.7e9, 0.6e9, "disk: O_DIRECT"))
    monkeypatch.setattr(calibrate, "profile_packed_attention_rate", lambda hw: calls.append(hw.name) or 1.5e9)
    old = toy_hw(layer_overhead=3e-5)          # disk_probe 0, no packed rate: a file from before the fields
    old.save(default_profile_path())
    logged = []
    hw = autopolicy.hardware_profile(None, tmp_path / "off", logged.append)
    assert (hw.disk_read_bw, hw.disk_write_bw, hw.disk_probe) == (0.7e9, 0.6e9, DISK_PROBE)
    assert hw.cpu_packed_attn_rate == 1.5e9
    assert "disk re-measured" in hw.notes and "4-bit host attention measured" in hw.notes
    assert hw.replace(disk_read_bw=old.disk_read_bw, disk_write_bw=old.disk_write_bw, disk_probe=0,
                      cpu_packed_attn_rate=0, notes=old.notes) == old
    assert load_hardware(None) == hw and calls == [tmp_path / "off", "toy"]
    assert "re-measuring the disk" in logged[0] and "4-bit host cache" in logged[1]
    assert autopolicy.hardware_profile(None, tmp_path / "off", logged.append) == hw
    assert len(calls) == 2 and len(logged) == 2
    # Only the rate missing: only it is measured.
    old.replace(disk_probe=DISK_PROBE).save(default_profile_path())
    hw = autopolicy.hardware_profile(None, tmp_path / "off", logged.append)
    assert hw.cpu_packed_attn_rate == 1.5e9 and hw.disk_read_bw == old.disk_read_bw and calls[2:] == ["toy"]


def test_bundled_t4_profile():
    assert not (POLICIES / "hardware_t4.json").exists()   # one copy: the one shipped in the package
    hw = load_hardware("t4")
    assert hw.gpu_mem - hw.gpu_reserved == 15 * GIB     # the T4's usable 15 GiB
    assert hw.compute_dtype == "float16" and not hw.unified_memory


# ---------------------------------------------------------------------------------------
# Policy files.

@pytest.mark.parametrize("row", PAPER_T4_ROWS, ids=lambda r: r.key)
def test_reference_policy_files(row):
    path = POLICIES / f"{row.key}.json"
    assert json.loads(path.read_text()) == reference_file(row)
    p = Policy.load(path)
    assert p == row.policy()
    assert all(float(v).is_integer() for v in p.percent)


def test_policy_json_round_trip(tmp_path):
    p = policy((12, 30, 50, 25, 0, 100), gbs=48, ngb=3, cpu_cache_compute=True, compress_cache=True)
    p.save(tmp_path / "p.json")
    assert Policy.load(tmp_path / "p.json") == p
    (tmp_path / "wrapped.json").write_text(json.dumps({"policy": p.to_dict(), "note": "x"}))
    assert Policy.load(tmp_path / "wrapped.json") == p


def test_original_weight_split():
    # The original placed whole tensors by midpoint: 20 % of OPT-30B gave only out_proj.
    g, c = original_weight_split(ModelArgs.from_name("opt-30b"), 20, 80)
    assert 7.5 < g < 9 and abs(g + c - 100) < 1e-9
    g, c = original_weight_split(ModelArgs.from_name("opt-175b"), 0, 50)
    assert g == 0 and abs(c - 50) < 0.1
    assert original_weight_split(OPT_125M, 100, 0) == (100.0, 0.0)


# ---------------------------------------------------------------------------------------
# Cost model.

def test_weight_and_cache_memory_match_the_engine_layout():
    from flexgen.layout import model_layouts
    import torch

    hw = toy_hw()
    s, n = 64, 16
    est = estimate(OPT_125M, policy((100, 0, 100, 0, 100, 0), gbs=8, ngb=2), s, n, hw)
    stored = sum(lay.nbytes for lay in model_layouts(OPT_125M, torch.float16, False))
    gpu = est.memory_breakdown["prefill"]["gpu"]
    assert gpu["weights"] == pytest.approx(stored)
    a = OPT_125M
    assert gpu["kv cache"] == pytest.approx(a.num_hidden_layers * 16 * 2 * (s + n) * a.hidden_size * 2)
    assert gpu.get("weight slots", 0) == 0 and est.memory["cpu"] == 0 and est.memory["disk"] == 0
    # Compressed weights: 4 bits + an fp16 pair per 64 values, about 0.28 of fp16 (the
    # embeddings may stay 16-bit: a few % of a large model).
    big = ModelArgs.from_name("opt-30b")
    plain = sum(l.stored for l in layer_costs(big, False, "float16"))
    packed = sum(l.stored for l in layer_costs(big, True, "float16"))
    assert 0.27 < packed / plain < 0.32


def test_weight_slots_appear_once_any_weight_leaves_the_gpu():
    hw = toy_hw()
    full = estimate(OPT_1_3B, policy((100, 0, 100, 0, 100, 0)), 128, 8, hw)
    part = estimate(OPT_1_3B, policy((99, 1, 100, 0, 100, 0)), 128, 8, hw)
    slot = max(l.slot for l in layer_costs(OPT_1_3B, False, "float16"))
    assert full.memory_breakdown["decode"]["gpu"].get("weight slots", 0) == 0
    assert part.memory_breakdown["decode"]["gpu"]["weight slots"] == 2 * slot
    assert part.memory_breakdown["decode"]["cpu"].get("weight staging", 0) == 0   # nothing on disk
    disk = estimate(OPT_1_3B, policy((50, 40, 100, 0, 100, 0)), 128, 8, hw)
    assert disk.memory_breakdown["decode"]["cpu"]["weight staging"] == 2 * slot


def test_fractions_follow_the_engine_row_split():
    from flexgen.placement import split_rows

    for gbs in (1, 3, 7, 48):
        for g, c in ((0, 0), (33, 33), (50, 50), (10, 85), (100, 0)):
            fr = fractions_of(policy((0, 100, g, c, g, c), gbs=gbs))
            r = split_rows(gbs, g, c)
            assert (fr["cg"] * gbs, fr["cc"] * gbs, fr["cd"] * gbs) == pytest.approx((r.gpu, r.cpu, r.disk))


def test_io_follows_placement():
    hw = toy_hw()
    s, n = 128, 9
    stored = sum(l.stored for l in layer_costs(OPT_1_3B, False, "float16"))
    on_gpu = estimate(OPT_1_3B, policy((100, 0, 100, 0, 100, 0)), s, n, hw)
    on_disk = estimate(OPT_1_3B, policy((0, 0, 100, 0, 100, 0)), s, n, hw)
    assert sum(on_gpu.io_bytes["decode"].values()) == 0
    # Every decode step streams every weight byte from disk, then to the gpu.
    assert on_disk.io_bytes["decode"]["disk->cpu"] == pytest.approx((n - 1) * stored)
    assert on_disk.io_bytes["decode"]["cpu->gpu"] == pytest.approx((n - 1) * stored)
    assert on_disk.throughput < on_gpu.throughput
    # Cache on the host: read back every step, unless the host attends itself.
    cpu_cache = estimate(OPT_1_3B, policy((100, 0, 0, 100, 100, 0), gbs=16), s, n, hw)
    host_attn = estimate(OPT_1_3B, policy((100, 0, 0, 100, 100, 0), gbs=16, cpu_cache_compute=True), s, n, hw)
    assert host_attn.io_bytes["decode"]["cpu->gpu"] < 0.05 * cpu_cache.io_bytes["decode"]["cpu->gpu"]
    assert host_attn.busy_time["decode"]["compute (host)"] > 0 == cpu_cache.busy_time["decode"]["compute (host)"]


def test_unified_memory_reads_disk_straight_into_the_compute_buffers():
    """On a CPU compute device a disk read lands in the layer slot / cache working buffer
    itself (weights.py, kvcache.py): only host-tier bytes are copied, and the copy time
    that unified memory adds to compute counts those alone."""
    hw = toy_hw(unified_memory=True, compute_device="cpu", compute_dtype="bfloat16")
    s, n = 32, 9
    stored = sum(l.stored for l in layer_costs(OPT_1_3B, False, "bfloat16"))
    on_disk = estimate(OPT_1_3B, policy((0, 0, 100, 0, 100, 0)), s, n, hw)
    on_host = estimate(OPT_1_3B, policy((0, 100, 100, 0, 100, 0)), s, n, hw)
    assert on_disk.io_bytes["decode"]["disk->cpu"] == pytest.approx((n - 1) * stored)
    assert on_disk.io_bytes["decode"]["cpu->gpu"] == 0
    assert on_host.io_bytes["decode"]["cpu->gpu"] == pytest.approx((n - 1) * stored)
    cuda = estimate(OPT_1_3B, policy((0, 0, 100, 0, 100, 0)), s, n, toy_hw())
    assert cuda.io_bytes["decode"]["cpu->gpu"] == pytest.approx((n - 1) * stored)   # through staging
    # KV cache rows on disk (the device attends): read into the working buffer directly.
    cache_disk = estimate(OPT_1_3B, policy((100, 0, 0, 0, 100, 0), gbs=8), s, n, hw)
    cache_host = estimate(OPT_1_3B, policy((100, 0, 0, 100, 100, 0), gbs=8), s, n, hw)
    assert cache_disk.io_bytes["decode"]["disk->cpu"] > 0 and cache_disk.io_bytes["decode"]["cpu->gpu"] == 0
    assert cache_host.io_bytes["decode"]["cpu->gpu"] == pytest.approx(cache_disk.io_bytes["decode"]["disk->cpu"])


def test_cache_stores_are_priced_at_the_quantize_rate():
    """With a 4-bit cache the prompt's K/V (prefill) and each new position (decode) are
    quantized at gpu_quant_rate, the history dequantized at gpu_dequant_rate; a profile
    without a quantize rate prices both at the dequant rate."""
    s, n, gbs, ngb = 64, 9, 8, 2
    a = OPT_1_3B
    p = policy((100, 0, 100, 0, 100, 0), gbs=gbs, ngb=ngb, compress_cache=True)
    rate = 1e9
    base = estimate(a, p, s, n, toy_hw(gpu_dequant_rate=rate))
    assert toy_hw(gpu_dequant_rate=rate).cache_quant_rate == rate
    slow = estimate(a, p, s, n, toy_hw(gpu_dequant_rate=rate, gpu_quant_rate=rate / 4))
    values = 2 * a.hidden_size * a.num_hidden_layers * gbs * ngb   # K and V of one position, every row
    extra = values * (1 / (rate / 4) - 1 / rate)
    # Prefill is compute-bound here: all of the extra time shows; decode quantizes one
    # position a step, n - 1 steps.
    assert slow.busy_time["prefill"]["compute (gpu)"] - base.busy_time["prefill"]["compute (gpu)"] \
        == pytest.approx(s * extra)
    assert slow.busy_time["decode"]["compute (gpu)"] - base.busy_time["decode"]["compute (gpu)"] \
        == pytest.approx((n - 1) * extra)
    # Uncompressed cache: the quantize rate does not enter.
    plain = policy((100, 0, 100, 0, 100, 0), gbs=gbs, ngb=ngb)
    assert estimate(a, plain, s, n, toy_hw(gpu_quant_rate=rate / 4)).total_time == \
        estimate(a, plain, s, n, toy_hw()).total_time


def test_host_attention_over_a_4bit_cache_is_priced_at_its_measured_rate():
    """Rows of a 4-bit cache that attend on the host (every row on a CPU device; the
    non-gpu rows with cpu_cache_compute on CUDA) are priced at cpu_packed_attn_rate, the
    attention and its dequantization together (kvcache.PackedAttention), when the profile
    has it; else at the separate attention and dequant rates. Rows dequantized on a GPU,
    and an uncompressed cache, never use it."""
    s, n, gbs, ngb = 64, 9, 8, 2
    a = OPT_1_3B
    t_att = s + n / 2
    values = 2 * gbs * ngb * t_att * a.hidden_size * a.num_hidden_layers   # K and V, every decode step
    rate = 1e9

    def decode_busy(pct, hw, **kw):
        est = estimate(a, policy(pct, gbs=gbs, ngb=ngb, **kw), s, n, hw)
        return est.busy_time["decode"], est.busy_time["prefill"]

    cpu = dict(compute_device="cpu", compute_dtype="bfloat16", unified_memory=True)
    for flags in (dict(compress_cache=True), dict(compress_cache=True, cpu_cache_compute=True)):
        (d1, p1), (d2, p2) = (decode_busy((0, 100, 0, 50, 100, 0), toy_hw(cpu_packed_attn_rate=r, **cpu), **flags)
                              for r in (rate, rate / 2))
        assert d2["compute (gpu)"] - d1["compute (gpu)"] == pytest.approx((n - 1) * values / rate)
        assert p2 == p1
    # CUDA with host attention: the half of the rows off the gpu tier, on the host's stream.
    (d1, _), (d2, _) = (decode_busy((100, 0, 50, 50, 100, 0), toy_hw(cpu_packed_attn_rate=r),
                                    compress_cache=True, cpu_cache_compute=True) for r in (rate, rate / 2))
    assert d2["compute (host)"] - d1["compute (host)"] == pytest.approx((n - 1) * values / 2 / rate)
    assert d2["compute (gpu)"] == d1["compute (gpu)"]
    # Never used: 4-bit rows dequantized on a GPU; an uncompressed cache.
    for hw_kw, pct, flags in ((dict(), (100, 0, 50, 50, 100, 0), dict(compress_cache=True)),
                              (cpu, (0, 100, 0, 50, 100, 0), dict())):
        assert decode_busy(pct, toy_hw(cpu_packed_attn_rate=rate, **hw_kw), **flags) == \
            decode_busy(pct, toy_hw(cpu_packed_attn_rate=rate / 2, **hw_kw), **flags)
    # A profile without the rate (0) prices the cache's dequantization and attention apart.
    (d0, _), (d1, _) = (decode_busy((0, 100, 0, 50, 100, 0), toy_hw(cpu_dequant_rate=r, gpu_dequant_rate=r, gpu_quant_rate=rate, **cpu),
                                    compress_cache=True) for r in (rate, rate / 2))
    assert d1["compute (gpu)"] - d0["compute (gpu)"] == pytest.approx((n - 1) * values / rate)


def test_overlap_and_bottleneck():
    hw = toy_hw()
    p = policy((0, 0, 0, 100, 0, 100), gbs=8, ngb=4)
    with_overlap = estimate(OPT_1_3B, p, 128, 16, hw)
    without = estimate(OPT_1_3B, dataclasses.replace(p, overlap=False), 128, 16, hw)
    assert without.total_time > with_overlap.total_time
    assert with_overlap.bottleneck["decode"] == "disk->cpu"      # weights stream from disk
    assert sum(with_overlap.bottleneck_share["decode"].values()) == pytest.approx(1.0)
    text = format_estimate(with_overlap)
    assert "token/s" in text and "disk→cpu" in text and "peak" in text


def test_more_batches_amortize_weight_loads():
    hw = toy_hw()
    one = estimate(OPT_1_3B, policy((0, 100, 100, 0, 100, 0), gbs=4, ngb=1), 64, 32, hw)
    many = estimate(OPT_1_3B, policy((0, 100, 100, 0, 100, 0), gbs=4, ngb=8), 64, 32, hw)
    assert many.throughput > 4 * one.throughput
    assert many.memory["gpu"] > one.memory["gpu"]


# ---------------------------------------------------------------------------------------
# The linear program.

BUDGETS = Budgets.from_request(toy_hw(), 2 * GIB, 8 * GIB, 100 * GIB)


def test_lp_solution_matches_the_estimate_and_fits():
    hw = toy_hw()
    for flags in (Policy(), Policy(cpu_cache_compute=True), Policy(compress_weight=True, compress_cache=True)):
        sol = solve_block(OPT_1_3B, 256, 32, 16, 4, hw, BUDGETS, flags)
        assert sol is not None
        est = evaluate(sol.model, sol.fractions, Policy(gpu_batch_size=16, num_gpu_batches=4))
        assert est.total_time == pytest.approx(sol.total_time, rel=1e-6)
        assert est.memory["gpu"] <= BUDGETS.gpu * (1 + 1e-6)
        assert est.memory["cpu"] <= BUDGETS.cpu * (1 + 1e-6)


def test_lp_beats_random_feasible_placements():
    hw = toy_hw()
    sol = solve_block(OPT_1_3B, 256, 32, 16, 4, hw, BUDGETS, Policy())
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        x = {}
        for group in (("wg", "wc", "wd"), ("cg", "cc", "cd"), ("hg", "hc", "hd")):
            a, b = sorted((rng.random(), rng.random()))
            if rng.random() < 0.3:
                a, b = rng.choice([(0, 0), (1, 1), (0, 1), (a, a)])
            x.update(zip(group, (a, b - a, 1 - b)))
        est = evaluate(sol.model, x, Policy(gpu_batch_size=16, num_gpu_batches=4))
        if check_budgets(est, BUDGETS):
            continue
        checked += 1
        assert est.total_time >= sol.total_time * (1 - 1e-6)
    assert checked > 10


def test_lp_with_fixed_fractions_reproduces_the_estimate():
    hw = toy_hw()
    p = policy((20, 50, 25, 50, 0, 100), gbs=8, ngb=2, cpu_cache_compute=True)
    est = estimate(OPT_1_3B, p, 256, 32, hw)
    sol = solve_block(OPT_1_3B, 256, 32, 8, 2, hw, Budgets.from_request(hw, 64 * GIB, 64 * GIB, 1e6 * GIB),
                      Policy(cpu_cache_compute=True), fixed=fractions_of(p))
    assert sol.total_time == pytest.approx(est.total_time, rel=1e-6)


def test_search_with_room_keeps_everything_on_the_gpu():
    hw = toy_hw(gpu_mem=64 * GIB)
    p, est = search(OPT_125M, 64, 16, hw, gpu_mem=64 * GIB, cpu_mem=8 * GIB, disk_mem=10 * GIB)
    assert (p.w_gpu_percent, p.cache_gpu_percent, p.act_gpu_percent) == (100, 100, 100)
    assert est.feasible and est.memory["cpu"] == 0 and est.memory["disk"] == 0
    assert est.throughput > 0


def test_search_binding_gpu_budget():
    hw = toy_hw()
    results = []
    for gpu_gib in (1.5, 3.0, 6.0):
        p, est = search(OPT_1_3B, 256, 32, hw, gpu_mem=gpu_gib * GIB, cpu_mem=16 * GIB, disk_mem=100 * GIB)
        assert all(float(v).is_integer() for v in p.percent)
        assert est.feasible and est.memory["gpu"] <= gpu_gib * GIB
        results.append((p, est))
    # 1.3B fp16 weights are 2.6 GB (2.45 GiB): 1.5 GiB cannot hold them; the small budgets are used up.
    assert results[0][0].w_gpu_percent < 100
    for (p, est), gib in zip(results[:2], (1.5, 3.0)):
        assert est.memory["gpu"] > 0.7 * gib * GIB
    # More memory never makes the best policy slower.
    tput = [est.throughput for _, est in results]
    assert tput[0] <= tput[1] * (1 + 1e-9) <= tput[2] * (1 + 1e-9)


def test_search_fixed_block_and_flags():
    hw = toy_hw()
    p, est = search(OPT_1_3B, 256, 32, hw, 2 * GIB, 16 * GIB, 100 * GIB, gpu_batch_size=8, num_gpu_batches=3)
    assert (p.gpu_batch_size, p.num_gpu_batches) == (8, 3)
    assert not p.compress_weight and not p.compress_cache
    p, _ = search(OPT_1_3B, 256, 32, hw, 2 * GIB, 16 * GIB, 100 * GIB, cpu_cache_compute=False)
    assert not p.cpu_cache_compute


@pytest.mark.parametrize("budgets, tier", [
    ((16, 200, 20), "disk"),     # OPT-30B weights alone are 56 GiB: cpu + disk too small
    ((0.05, 200, 1000), "gpu"),  # not even one layer's working slots fit
])
def test_search_infeasible_names_the_binding_budget(budgets, tier):
    g, c, d = budgets
    cpu = 8 if tier == "disk" else c
    with pytest.raises(FlexGenError, match=rf"needs at least [\d.]+ GiB of {tier} memory.*more needed"):
        search(ModelArgs.from_name("opt-30b"), 512, 32, toy_hw(), g * GIB, cpu * GIB, d * GIB)


def test_slack_program_finds_the_shortfall():
    model = BlockModel(ModelArgs.from_name("opt-30b"), 512, 32, 1, 1, toy_hw())
    budgets = Budgets.from_request(toy_hw(), 16 * GIB, 8 * GIB, 20 * GIB)
    prob, x, slacks, _ = build_lp(model, budgets, slack=True)
    assert _solve(prob)
    short = {t: s.value() for t, s in slacks.items()}
    # Weights need ~56 GiB; 16 + 8 + 20 = 44 are offered: the rest is asked of the disk.
    assert short["disk"] > model.weight_bytes / GIB - 44
    assert short["gpu"] == short["cpu"] == 0


# ---------------------------------------------------------------------------------------
# The paper's T4 runs (benchmarks/paper_t4.py, from the FlexGen paper's Table 2).

T4 = load_hardware("t4")
T4_BUDGETS = Budgets.from_request(T4, *(PAPER_BUDGETS_GIB[t] * GIB for t in ("gpu", "cpu", "disk")))


@pytest.mark.parametrize("row", PAPER_T4_ROWS, ids=lambda r: r.key)
def test_t4_prediction_within_1_5x_of_the_paper(row):
    est = estimate(ModelArgs.from_name(row.model), row.policy(), PROMPT_LEN, GEN_LEN, T4)
    assert 1 / 1.5 <= est.throughput / row.throughput <= 1.5


@pytest.mark.parametrize("row", PAPER_T4_ROWS, ids=lambda r: r.key)
def test_t4_paper_policies_fit_the_paper_budgets(row):
    args = ModelArgs.from_name(row.model)
    est = estimate(args, row.policy(), PROMPT_LEN, GEN_LEN, T4, budgets=T4_BUDGETS)
    assert est.feasible, est.shortfalls
    # The fused attention matters: the 10 bytes per score element that an unfused fp32
    # softmax keeps alive (the engine's attention before it used SDPA) would not fit.
    if row.key == "paper_opt-175b_4bit":
        unfused = dataclasses.replace(DEFAULT_ENGINE, attn_score_bytes=10.0)
        assert not estimate(args, row.policy(), PROMPT_LEN, GEN_LEN, T4, budgets=T4_BUDGETS,
                            engine=unfused).feasible


@pytest.mark.parametrize("row", PAPER_T4_ROWS, ids=lambda r: r.key)
def test_t4_optimizer_at_least_matches_the_paper_policy(row):
    args = ModelArgs.from_name(row.model)
    paper = estimate(args, row.policy(), PROMPT_LEN, GEN_LEN, T4)
    p, est = search(args, PROMPT_LEN, GEN_LEN, T4, *(PAPER_BUDGETS_GIB[t] * GIB for t in ("gpu", "cpu", "disk")),
                    **row.search_kwargs())
    assert est.feasible
    assert est.throughput >= paper.throughput
    assert (p.compress_weight <= row.search_kwargs()["allow_compress_weight"]
            and p.compress_cache <= row.search_kwargs()["allow_compress_cache"])
    # The estimate the search returns is the estimate of the policy it returns.
    again = estimate(args, p, PROMPT_LEN, GEN_LEN, T4, budgets=T4_BUDGETS)
    assert again.throughput == pytest.approx(est.throughput) and again.feasible


# ---------------------------------------------------------------------------------------
# CLI.

@pytest.fixture
def hw_file(tmp_path):
    return str(toy_hw().save(tmp_path / "toy.json"))


def test_cli_search_json(capsys, hw_file, tmp_path):
    out = tmp_path / "chosen.json"
    assert policy_main(["--model", "opt-1.3b", "--prompt-len", "256", "--gen-len", "32", "--gpu-mem", "2",
                        "--cpu-mem", "16", "--disk-mem", "100", "--hardware", hw_file, "--json",
                        "--save", str(out)]) == 0
    d = json.loads(capsys.readouterr().out)
    p = Policy.from_dict(d["policy"])
    assert d["mode"] == "search" and d["throughput"] > 0
    assert set(d["memory"]) == {"gpu", "cpu", "disk"} and d["memory"]["gpu"] <= 2 * GIB
    assert Policy.load(out) == p


def test_cli_evaluate_table(capsys, hw_file):
    assert policy_main(["--model", "opt-1.3b", "--gpu-mem", "4", "--cpu-mem", "16", "--hardware", hw_file,
                        "--percent", "50", "50", "100", "0", "100", "0", "--gpu-batch-size", "8",
                        "--num-gpu-batches", "2", "--prompt-len", "128", "--gen-len", "8"]) == 0
    text = capsys.readouterr().out
    assert "throughput" in text and "given policy" in text and "memory (GiB)" in text


def test_cli_evaluates_a_policy_file(capsys):
    assert policy_main(["--model", "opt-30b", "--hardware", "t4", "--gpu-mem", "16", "--cpu-mem", "208",
                        "--disk-mem", "1500", "--policy", str(POLICIES / "paper_opt-30b_4bit.json"),
                        "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mode"] == "evaluate" and d["policy"]["compress_cache"] is True
    assert 8.38 / 1.5 < d["throughput"] < 8.38 * 1.5


@pytest.mark.parametrize("argv, match", [
    (["--model", "opt-7b"], "unknown model"),
    (["--model", "opt-1.3b", "--percent", "1", "2", "3"], "--percent"),
    (["--model", "opt-1.3b", "--percent", "50", "50", "100", "0", "100", "0"], "--gpu-batch-size"),
    (["--model", "opt-1.3b", "--percent", "80", "50", "100", "0", "100", "0", "--gpu-batch-size", "2"],
     "exceeds 100"),
    (["--model", "opt-1.3b", "--gpu-mem", "-1"], "non-negative"),
    (["--model", "opt-1.3b", "--gpu-batch-size", "0"], ">= 1"),
    (["--model", "opt-1.3b", "--prompt-len", "2040", "--gen-len", "32"], "positions"),
    (["--model", "opt-1.3b", "--hardware", "imaginary"], "unknown hardware profile"),
    (["--model", "opt-1.3b", "--hardware", "/nonexistent/hw.json"], "not found"),
    (["--model", "opt-1.3b", "--policy", "/nonexistent/p.json"], "not found"),
    (["--model", "opt-1.3b", "--policy", "x.json", "--percent", "1", "1", "1", "1", "1", "1"], "either"),
    (["--model", "opt-30b", "--gpu-mem", "16", "--cpu-mem", "8", "--disk-mem", "20"], "needs at least"),
    (["--model", "opt-1.3b", "--gpu-mem", "1", "--percent", "100", "0", "100", "0", "100", "0",
      "--gpu-batch-size", "4"], "does not fit: needs .* of gpu memory .* more needed"),
])
def test_cli_errors(argv, match, hw_file):
    if "--hardware" not in argv:
        argv = argv + ["--hardware", hw_file]
    with pytest.raises(FlexGenError, match=match):
        policy_main(argv)


def test_top_level_cli_prints_one_line_errors(hw_file):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "flexgen", "policy", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    r = run("--model", "opt-125m", "--hardware", hw_file, "--json", "--prompt-len", "32", "--gen-len", "8")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["throughput"] > 0
    r = run("--model", "opt-30b", "--hardware", hw_file, "--gpu-mem", "16", "--cpu-mem", "8", "--disk-mem", "20")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "needs at least" in r.stderr


def test_profile_quick(tmp_path, capsys):
    out = tmp_path / "hw.json"
    assert profile_main(["--quick", "--device", "cpu", "--out", str(out), "--offload-dir",
                         str(tmp_path / "off"), "--name", "here"]) == 0
    hw = HardwareProfile.load(out)
    assert hw.name == "here" and hw.compute_device == "cpu" and hw.unified_memory
    assert hw.compute_dtype in ("bfloat16", "float32") and hw.date
    assert hw.disk_read_bw > 1e6 and hw.gpu_matmul_flops > 1e8
    assert hw.gpu_quant_rate > 1e5 and hw.cache_quant_rate == hw.gpu_quant_rate
    assert hw.cpu_packed_attn_rate > 1e5
    assert hw.disk_probe == DISK_PROBE
    assert not list((tmp_path / "off").iterdir())   # the probe file is gone
    assert "wrote" in capsys.readouterr().out
    # The measured profile drives a search.
    p, est = search(OPT_125M, 32, 8, hw, gpu_mem=1 * GIB, cpu_mem=2 * GIB, disk_mem=4 * GIB)
    assert est.throughput > 0


def test_cpu_budget_is_for_tensors_and_the_reserve_comes_off_the_machine_once():
    # A cpu budget under what the machine has once the process is counted is kept whole
    # (a 0.5 GiB budget used to lose a 2 GiB reserve and hold nothing); one beyond it is cut
    # to it; on unified memory gpu + cpu share that same remainder; the gpu reserve (CUDA
    # context) comes off the gpu budget, which names the card.
    hw = toy_hw().replace(cpu_mem=16 * GIB, cpu_reserved=2 * GIB, gpu_reserved=GIB)
    b = Budgets.from_request(hw, 8 * GIB, 0.5 * GIB, 10 * GIB)
    assert (b.gpu, b.cpu, b.disk, b.combined) == (7 * GIB, 0.5 * GIB, 10 * GIB, None)
    assert Budgets.from_request(hw, 8 * GIB, 15 * GIB, 10 * GIB).cpu == 14 * GIB
    assert Budgets.from_request(hw).cpu == 14 * GIB
    unified = hw.replace(unified_memory=True, gpu_reserved=0)
    b = Budgets.from_request(unified, 4 * GIB, 3 * GIB, 10 * GIB)
    assert (b.gpu, b.cpu, b.combined) == (4 * GIB, 3 * GIB, 14 * GIB)


def test_quick_profile_times_full_size_kernels_on_a_gpu():
    """Small kernels time launch latency on a GPU: --quick shrinks them on a CPU only."""
    from flexgen.calibrate import kernel_sizes
    assert kernel_sizes("cuda", quick=True) == kernel_sizes("cuda", quick=False)
    m, k, n = kernel_sizes("cuda", quick=True)["matmul"]
    assert 2 * m * k * n >= 1e12                  # ~1 ms even at 1 PFLOP/s
    qm, qk, qn = kernel_sizes("cpu", quick=True)["matmul"]
    assert qm * qk * qn < m * k * n


# ---------------------------------------------------------------------------------------
# Matmul rate by row count.

def test_matmul_rate_table_interpolates_in_log_rows_and_round_trips(tmp_path):
    hw = toy_hw(gpu_matmul_by_rows=[[1024, 400e9], [16, 100e9], [256, 300e9]])   # any order, lists (JSON)
    assert hw.gpu_matmul_by_rows == ((16, 100e9), (256, 300e9), (1024, 400e9))
    assert hw.matmul_rate(16) == 100e9 and hw.matmul_rate(1024) == 400e9
    assert hw.matmul_rate(10**6) == 400e9                                         # held above the table
    assert hw.matmul_rate(4) == pytest.approx(25e9)          # below it the time of 16 rows (weight reads)
    assert hw.matmul_rate(64) == pytest.approx(200e9)                             # halfway in log rows
    assert HardwareProfile.load(hw.save(tmp_path / "hw.json")) == hw
    assert load_hardware("t4").gpu_matmul_by_rows == ()                           # older profiles: no table
    assert load_hardware("t4").matmul_rate(64) == load_hardware("t4").gpu_matmul_flops
    for bad in ([[0, 1e9]], [[16, -1.0]], [[16, 1e9], [16, 2e9]], ["x"]):
        with pytest.raises(FlexGenError, match="gpu_matmul_by_rows"):
            toy_hw(gpu_matmul_by_rows=bad)


def test_cost_model_prices_small_batches_at_their_measured_rate():
    """Decode multiplies gpu_batch_size rows: with a table that says 16-row matmuls run at a
    quarter of the 1024-row rate, a 16-row decode costs more per row than a 1024-row one."""
    cpu = dict(unified_memory=True, compute_device="cpu", compute_dtype="bfloat16", gpu_mem=64 * GIB,
               gpu_matmul_flops=400e9, gpu_mem_bw=1e15)
    flat = toy_hw(**cpu, gpu_matmul_by_rows=[[16, 400e9], [1024, 400e9]])
    slow = toy_hw(**cpu, gpu_matmul_by_rows=[[16, 100e9], [1024, 400e9]])
    pol_small, pol_big = policy([100, 0, 100, 0, 100, 0], gbs=16), policy([100, 0, 100, 0, 100, 0], gbs=1024)
    small_flat, small_slow = (estimate(OPT_1_3B, pol_small, 32, 8, h).decode_time for h in (flat, slow))
    big_flat, big_slow = (estimate(OPT_1_3B, pol_big, 32, 8, h).decode_time for h in (flat, slow))
    assert small_slow > 2.5 * small_flat          # matmuls dominate a 16-row decode
    assert big_slow == pytest.approx(big_flat)    # same rate at 1024 rows
    # The old two-term model is kept without a table.
    assert estimate(OPT_1_3B, pol_small, 32, 8, toy_hw(**cpu)).decode_time == pytest.approx(small_flat, rel=0.05)


def test_search_rounds_further_down_when_the_best_lp_solutions_do_not_round(monkeypatch):
    """The LP's best placements can all sit where whole percents overflow a budget: the
    search goes on down the list instead of giving up."""
    import flexgen.optimizer.solver as solver
    real, calls = solver.round_solution, []

    def first_ten_fail(sol, *a, **kw):
        calls.append(sol)
        return None if len(calls) <= 10 else real(sol, *a, **kw)
    monkeypatch.setattr(solver, "round_solution", first_ten_fail)
    _, est = solver.search(OPT_125M, 64, 8, toy_hw(), gpu_mem=GIB, cpu_mem=4 * GIB, disk_mem=20 * GIB)
    assert len(calls) > 10 and est.throughput > 0
