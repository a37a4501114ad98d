"""The GPU suite's CPU self-test: the parts that run without CUDA, so the script does not rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def test_gpu_suite_self_test(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    out = tmp_path / "suite.json"
    rc = suite.main(["--self-test", "--out", str(out), "--budget", "300"])
    results = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert set(results) == {"env", "sdpa_kernel", "dequant_speed", "pinned_bandwidth", "tokens", "sync_count",
                            "weight_streaming", "plan_pinned", "paper_rows"}
    for name in ("pinned_bandwidth", "sync_count", "paper_rows"):
        assert results[name]["status"] == "SKIP"          # need CUDA
    for name in ("env", "sdpa_kernel", "dequant_speed", "tokens", "weight_streaming", "plan_pinned"):
        assert results[name]["status"] == "OK", results[name]
        assert f"OK   {name}" in printed
    assert all(v is True for v in results["tokens"]["policies"]["all-gpu"].values())
    assert rc == 0


def test_gpu_suite_runs_a_chosen_subset_and_refuses_unknown_checks(tmp_path, capsys):
    import pytest
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    out = tmp_path / "suite.json"
    assert suite.main(["--self-test", "--out", str(out), "--checks", "env,weight_streaming"]) == 0
    results = json.loads(out.read_text())
    assert list(results) == ["env", "weight_streaming"]
    assert results["weight_streaming"]["overlap"]["host_weights_gib"] > 0
    with pytest.raises(SystemExit):
        suite.main(["--self-test", "--out", str(out), "--checks", "env,nope"])
    assert "unknown check(s): nope" in capsys.readouterr().err
