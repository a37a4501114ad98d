"""The CLI: a real run, and one clear error line (no traceback) for each user mistake."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

PY = sys.executable


def cli(*args, cwd=None, timeout=120):
    return subprocess.run([PY, "-m", "flexgen", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def assert_one_line_error(res, *needles):
    assert res.returncode != 0
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("flexgen: error:") or "error:" in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], err


def test_run_with_tokenizer_and_json(opt_dir, tmp_path):
    path, _ = opt_dir
    out = tmp_path / "r.json"
    res = cli("--model", path, "--percent", 30, 30, 30, 30, 30, 30, "--gpu-batch-size", 2, "--num-gpu-batches", 2,
              "--prompt-len", 8, "--gen-len", 4, "--offload-dir", tmp_path / "off", "--dtype", "float32",
              "--json-out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "sample:" in res.stdout and "total" in res.stdout
    r = json.loads(out.read_text())
    assert r["num_sequences"] == 4 and r["gen_len"] == 4
    assert r["total_throughput_tok_s"] > 0
    assert r["peak_memory_bytes"]["disk"] > 0 and r["peak_memory_bytes"]["cpu"] > 0
    assert abs(r["achieved_percent"]["weights"][0] - 30) < 1
    assert not list((tmp_path / "off").glob("run-*"))


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/ckpt"], "not a checkpoint directory"),
    (["--model", "opt-nonsense", "--dummy"], "unknown model"),
    (["--model", "opt-125m", "--dummy", "--percent", 120, 0, 100, 0, 100, 0], "w_gpu_percent"),
    (["--model", "opt-125m", "--dummy", "--percent", 60, 60, 100, 0, 100, 0], "exceeds 100"),
    (["--model", "opt-125m", "--dummy", "--gpu-batch-size", 0], "gpu_batch_size"),
    (["--model", "opt-125m", "--dummy", "--num-gpu-batches", -1], "num_gpu_batches"),
    (["--model", "opt-125m", "--dummy", "--prompt-len", 2000, "--gen-len", 100], "positions"),
    (["--model", "opt-125m", "--dummy", "--dtype", "float16", "--device", "cpu"], "float16"),
    (["--model", "opt-125m", "--dummy", "--policy", "/nonexistent.json"], "policy file not found"),
])
def test_bad_input_one_line(tmp_path, args, needle):
    assert_one_line_error(cli(*args, "--offload-dir", tmp_path / "off", "--quiet"), needle)


def test_non_opt_checkpoint(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert_one_line_error(cli("--model", d, "--offload-dir", tmp_path / "off"), "model_type 'bert'", "not supported")


def test_missing_weights_and_truncated_safetensors(opt350_dir, tmp_path):
    import shutil
    src, _ = opt350_dir
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("--model", d, "--offload-dir", tmp_path / "off"), "model.safetensors")
    f.unlink()
    assert_one_line_error(cli("--model", d, "--offload-dir", tmp_path / "off"), "no model.safetensors")


def test_unwritable_offload_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")   # a file where a directory is needed
    assert_one_line_error(cli("--model", "opt-125m", "--dummy", "--offload-dir", blocker / "sub"), "offload")


def test_ctrl_c_removes_run_files(tmp_path):
    off = tmp_path / "off"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = ["--model", "opt-125m", "--dummy", "--percent", 0, 0, 0, 0, 0, 0, "--gpu-batch-size", 2,
            "--prompt-len", 32, "--gen-len", 500, "--offload-dir", off, "--dtype", "float32", "--quiet"]
    # A suite started in the background (`cmd &` in a script) hands its children SIGINT
    # ignored, and Python then keeps it ignored: give the child Ctrl-C's default back.
    proc = subprocess.Popen([PY, "-m", "flexgen", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not list(off.glob("run-*/kv_layer_*")):
        time.sleep(0.1)
    assert list(off.glob("run-*/kv_layer_*")), "the run never reached generation"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not list(off.glob("run-*")), "run files left after Ctrl-C"


def test_clean_removes_store(opt_dir, tmp_path):
    path, _ = opt_dir
    off = tmp_path / "off"
    assert cli("--model", path, "--gen-len", 2, "--prompt-len", 4, "--offload-dir", off, "--quiet").returncode == 0
    assert list((off / "weights").glob("*/manifest.json"))
    res = cli("clean", "--offload-dir", off)
    assert res.returncode == 0 and not (off / "weights").exists()


def test_gpu_mem_dry_run_chooses_policy(tmp_path):
    res = cli("--model", "opt-30b", "--dummy", "--gpu-mem", 16, "--cpu-mem", 200, "--disk-mem", 1500,
              "--hardware", "t4", "--prompt-len", 512, "--gen-len", 32, "--dry-run", "--offload-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "--percent" in res.stdout and "throughput" in res.stdout
    assert not (tmp_path / "weights").exists()   # a dry run loads nothing


def test_gpu_mem_infeasible_names_budget(tmp_path):
    res = cli("--model", "opt-175b", "--dummy", "--gpu-mem", 16, "--cpu-mem", 200, "--disk-mem", 20,
              "--hardware", "t4", "--dry-run", "--offload-dir", tmp_path)
    assert_one_line_error(res, "disk")
