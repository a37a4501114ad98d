"""gpu_compare.py's CPU self-test: every system's path on a tiny model, offline, so the script does not rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_compare.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_compare", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_compare_self_test(tmp_path, capsys):
    out = tmp_path / "compare.json"
    rc = _load().main(["--self-test", "--out", str(out), "--budget", "300"])
    data = json.loads(out.read_text())
    printed = capsys.readouterr().out
    rows = {r["system"]: r for r in data["rows"]}
    assert set(rows) == {"flexgen", "original", "accelerate", "flexgen-paper"}
    for name in ("flexgen", "accelerate", "flexgen-paper"):
        assert rows[name].get("throughput", 0) > 0, rows[name]
        assert rows[name]["prefill_s"] > 0 and rows[name]["decode_s"] > 0
    assert "skipped" in rows["original"] and "--fetch-original" in rows["original"]["skipped"]   # no download here
    assert "block shrunk from 48x3" in rows["flexgen-paper"]["note"]
    assert rows["accelerate"]["device_map"] == {"cpu": 1}
    assert "| flexgen | " in printed and "| accelerate | " in printed
    assert data["self_test"] is True and rc == 0
    # Each system's output is kept, with its progress lines.
    assert "weights generated and placed" in (tmp_path / "compare_logs" / "flexgen.log").read_text()
    assert "token step 1" in (tmp_path / "compare_logs" / "accelerate.log").read_text()



def test_fit_block_and_feasibility():
    gc = _load()
    cfg = gc.hf_config("opt-30b")
    w, c = gc.sizes(cfg, 144, 544)
    assert 55e9 < w < 65e9 and 100e9 < c < 115e9          # 30B fp16 weights; the paper block's KV cache
    gbs, ngb, need = gc.fit_block(cfg, 48, 3, 80, 100, 512, 32, 128 * gc.GIB)
    assert (gbs, ngb) == (48, 1) and need <= 0.75 * 128 * gc.GIB
    args = type("A", (), {"model_key": "opt-175b", "prompt_len": 512, "gen_len": 32})()
    cfg175 = gc.hf_config("opt-175b")
    assert "exceed host RAM" in gc.feasibility("accelerate", args, cfg175, 128 * gc.GIB, 64 * gc.GIB)
    assert gc.feasibility("original", args, cfg175, 128 * gc.GIB, 64 * gc.GIB).startswith("skipped:")


def test_parse_original_log():
    spec = importlib.util.spec_from_file_location("orig_run", SCRIPT.parent / "original_flexgen_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    log = ("model size: 55.803 GB\tcache size: 35.969 GB\thidden size (p): 0.176 GB\n"
           "peak gpu mem: 7.341 GB\tprojected: False\n"
           "prefill latency: 40.108 s\tprefill throughput: 612.846 token/s\n"
           "decode latency: 60.000 s\tdecode throughput: 24.800 token/s\n"
           "total latency: 100.108 s\ttotal throughput: 15.343 token/s\n")
    r = mod.parse_log(log)
    assert r["prefill_s"] == 40.108 and r["decode_s"] == 60.0 and r["throughput"] == 15.343
    assert r["peak_gpu_gb"] == 7.341 and r["projected"] is False


def test_out_of_time_and_crash_are_rows(tmp_path):
    """A child killed at its time limit is a row that says how far it got (its log is kept)."""
    import sys
    gc = _load()
    code = "import sys, time; print('[    0.1 s] weights placed', file=sys.stderr, flush=True); time.sleep(60)"
    log = tmp_path / "logs" / "slow.log"
    r = gc.run_child([sys.executable, "-c", code], 3, "slow", log)
    assert r["system"] == "slow"
    assert r["failed"].startswith("out of time (3 s slice); last: [    0.1 s] weights placed"), r
    assert r["wall_s_total"] < 30 and "weights placed" in log.read_text()
    r = gc.run_child([sys.executable, "-c", "raise MemoryError('CUDA out of memory')"], 30, "oom", tmp_path / "oom.log")
    assert r["failed"].startswith("out of memory")


def test_step_clock_stops_after_a_decode_step_past_the_deadline():
    import pytest
    gc = _load()
    clock = gc.StepClock(deadline=0.0)
    clock.put(None)            # the prompt
    clock.put(None)            # the first new token (prefill): never stopped here
    with pytest.raises(gc._Stop):
        clock.put(None)        # one decode step: enough to project from
