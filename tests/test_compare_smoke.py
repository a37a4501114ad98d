"""benchmarks/compare.py in its smoke mode, so the comparison harness does not rot."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compare_smoke(tmp_path):
    out = tmp_path / "cmp.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--workload", "smoke",
                        "--hardware", "t4", "--ckpt-dir", str(tmp_path / "ckpt"), "--json-out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["token_agreement"] is not None and data["token_agreement"] > 0.5   # same weights, bf16 kernels
    # flexgen's tokens fed to transformers: each is (near) transformers' argmax.
    forced = data["teacher_forced"]
    assert forced["positions"] == 8 * 4 and forced["argmax_share"] > 0.9, forced
    assert [row["system"] for row in rows] == ["transformers", "accelerate", "flexgen-auto", "flexgen"]
    for row in rows:
        assert "failed" not in row, row
        assert row["generated_tokens"] == row["batch"] * 4
        assert row["throughput"] > 0 and row["prefill_s"] > 0 and row["decode_s"] > 0
    assert "| flexgen-auto |" in r.stdout
    # The checkpoint is written once, sharded, and re-used.
    assert (tmp_path / "ckpt" / "tiny" / "model.safetensors.index.json").is_file()
    assert not list((tmp_path / "ckpt").glob("compare-*")), "scratch offload dirs left behind"


def test_compare_terminated_removes_its_scratch_and_child(tmp_path):
    """SIGTERM mid-run (a user's kill, a job scheduler's) removes the scratch directory,
    which holds a weight store as large as the model, and ends the child it was running."""
    import signal
    import time
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--workload", "smoke",
                             "--hardware", "t4", "--ckpt-dir", str(ckpt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(ckpt.glob("compare-*/*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and list(ckpt.glob("compare-*/*")), "no child run started"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not list(ckpt.glob("compare-*")), "scratch left behind"
    children = subprocess.run(["pgrep", "-f", str(ckpt / "compare-")], capture_output=True, text=True).stdout
    assert not children.strip(), children
    # Nor its memory cgroup, where it could make one (root, cgroup v1 or v2).
    for root in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        assert not Path(root, f"flexgen-compare-{proc.pid}").exists(), "memory cgroup left behind"


def test_compare_ablations_smoke(tmp_path):
    """--ablations: the optimizer's policy with one optimisation off (or 4-bit on) at a
    time, then flexgen with Accelerate's placement at Accelerate's best batch."""
    out = tmp_path / "cmp.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--workload", "smoke",
                        "--systems", "accelerate", "flexgen-auto", "--ablations", "--hardware", "t4",
                        "--ckpt-dir", str(tmp_path / "ckpt"), "--json-out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["system"] for row in rows] == [
        "accelerate", "flexgen-auto", "flexgen-auto (overlap=false)", "flexgen-auto (num_gpu_batches=1)",
        "flexgen-auto (cpu_cache_compute=false)", "flexgen-auto (compress_weight=true)",
        "flexgen-auto (compress_cache=true)", "flexgen (Accelerate's placement)"]
    base = rows[1]["policy"]
    for row in rows:
        assert "failed" not in row, row
        assert row["throughput"] > 0
    for row, (field, value) in zip(rows[2:7], [("overlap", False), ("num_gpu_batches", 1),
                                               ("cpu_cache_compute", False), ("compress_weight", True),
                                               ("compress_cache", True)]):
        changed = {k for k in base if row["policy"][k] != base[k]}
        assert row["policy"][field] == value and changed <= {field}, (row["system"], changed)
    acc = rows[-1]["policy"]
    placed = rows[0]["device_map"] or {"cpu": 1}  # none: the whole model stayed in memory
    kept = sum(n for d, n in placed.items() if d != "disk") / sum(placed.values())
    assert (acc["gpu_batch_size"], acc["num_gpu_batches"]) == (rows[0]["batch"], 1)
    assert abs(acc["w_gpu_percent"] - 100 * kept) < 0.1 and acc["cache_gpu_percent"] == 100


def _load_compare():
    """benchmarks/compare.py as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = compare   # its dataclasses look their module up there
    try:
        spec.loader.exec_module(compare)
    finally:
        del sys.modules["compare"]
    return compare


def test_still_rising_flags_a_peer_whose_best_batch_is_the_largest_tried():
    compare = _load_compare()
    assert compare.still_rising({"16": 1.0, "32": 1.9})
    assert not compare.still_rising({"16": 1.0, "32": 1.9, "64": 1.5})
    # a larger batch the cgroup killed does not count as tried successfully, nor as the best
    assert not compare.still_rising({"64": 16.6, "128": 23.5, "256": "killed by the cgroup's OOM killer"})
    assert not compare.still_rising({"32": 1.9})           # one size says nothing about the trend
    assert not compare.still_rising({"32": "failed", "64": "failed"})


def test_bench_matmul_cache_smoke():
    """benchmarks/bench_matmul_cache.py at tiny sizes: one table row per row count."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_matmul_cache.py"), "--dtype", "float32",
                        "--k", "64", "--n", "128", "--weights", "3", "--rows", "1", "8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "rows" not in line]
    assert [int(c[0]) for c in rows] == [1, 8]
    assert all(float(c[1]) > 0 and float(c[2]) > 0 for c in rows)


def test_cgroup_close_retries_then_says_what_it_left(tmp_path, capsys):
    """A cgroup directory the kernel still holds busy is retried, then named on stderr
    (never an exception at the end of a long run); one that frees up is removed."""
    compare = _load_compare()
    cg = compare.MemoryCgroup.__new__(compare.MemoryCgroup)
    cg.path = tmp_path / "busy"
    cg.path.mkdir()
    (cg.path / "held").write_text("x")        # rmdir fails: not empty, as a busy cgroup
    cg.close(wait_s=0.3)
    assert cg.path.is_dir() and str(cg.path) in capsys.readouterr().err
    (cg.path / "held").unlink()
    cg.close(wait_s=0.3)
    assert not cg.path.exists() and capsys.readouterr().err == ""


def test_mean_profile_averages_the_rates_of_two_measurements():
    from flexgen.optimizer.hardware import load_hardware
    compare = _load_compare()
    a = load_hardware("t4").replace(disk_read_bw=1e9, gpu_matmul_by_rows=((64, 1e12), (128, 2e12)))
    b = a.replace(disk_read_bw=3e9, gpu_mem=a.gpu_mem * 2, gpu_matmul_by_rows=((128, 4e12), (256, 5e12)))
    m = compare.mean_profile([a, b])
    assert m.disk_read_bw == 2e9 and m.gpu_matmul_flops == a.gpu_matmul_flops
    assert m.gpu_matmul_by_rows == ((128, 3e12),)          # only the row counts both measured
    assert m.gpu_mem == a.gpu_mem and m.name == a.name       # capacities and names: the first's


def test_measure_rates_bounds_a_run_with_rates_measured_just_before_and_after(monkeypatch, tmp_path):
    """--measure-rates: the machine is measured before and after a flexgen run, and the
    run's bound is also computed with the mean of the two; a slower machine, a longer bound."""
    from types import SimpleNamespace

    from flexgen import Policy
    from flexgen.optimizer.hardware import load_hardware
    compare = _load_compare()
    fast = load_hardware("t4")
    slow = fast.replace(gpu_matmul_flops=fast.gpu_matmul_flops / 3, gpu_mem_bw=fast.gpu_mem_bw / 3,
                        disk_read_bw=fast.disk_read_bw / 3, cpu_to_gpu_bw=fast.cpu_to_gpu_bw / 3)
    calls = []
    profiles = iter([fast, slow])
    monkeypatch.setattr(compare, "rates_now", lambda scratch: calls.append("measure") or next(profiles))
    policy = Policy(w_gpu_percent=50, w_cpu_percent=50, gpu_batch_size=8)

    def child(args, limit, timeout):
        calls.append("run")
        return {"policy": policy.to_dict(), "prefill_s": 1.0, "decode_s": 1.0}
    monkeypatch.setattr(compare, "run_child", child)
    monkeypatch.setattr(compare, "drop_page_cache", lambda: True)
    a = SimpleNamespace(measure_rates=True, timeout=10)
    w = SimpleNamespace(limit_gib=None, prompt_len=64, gen_len=8)
    r = compare.run_flexgen([], a, w, "opt-1.3b", tmp_path)
    assert calls == ["measure", "run", "measure"]
    mean = compare.mean_profile([fast, slow])
    assert r["bound_now"] == compare.phase_bounds("opt-1.3b", policy, 64, 8, mean)
    fast_bound = compare.phase_bounds("opt-1.3b", policy, 64, 8, fast)
    assert r["bound_now"]["decode"]["seconds"] > fast_bound["decode"]["seconds"]
    assert r["rates_now"]["disk_read_bw"] == mean.disk_read_bw
    # Without the flag: just the run.
    calls.clear()
    assert compare.run_flexgen([], SimpleNamespace(measure_rates=False, timeout=10), w, "opt-1.3b", tmp_path) \
        == {"policy": policy.to_dict(), "prefill_s": 1.0, "decode_s": 1.0}
    assert calls == ["run"]
