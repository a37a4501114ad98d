"""`python -m flexgen generate`: the resumable JSONL job, killed and resumed for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flexgen.cli import main

WORDS = "Paris is the capital city of France the quick brown fox jumps over lazy dog".split()


def write_input(path, n=30, extra=()):
    import random
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}" if i % 3 else i,
                                "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))}) + "\n")
        for line in extra:
            f.write(line + "\n")


def cmd(ckpt, inp, out, offload, *extra):
    return [sys.executable, "-m", "flexgen", "generate", "--model", str(ckpt), "--input", str(inp), "--output",
            str(out), "--max-new-tokens", "6", "--dtype", "float32", "--gpu-batch-size", "2", "--percent", "50", "50",
            "50", "50", "100", "0", "--offload-dir", str(offload), "--quiet", *extra]


def ids_in(path):
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_bytes().split(b"\n")[:-1]]


def lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.fixture(scope="module")
def reference(opt_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("job-ref")
    write_input(d / "in.jsonl")
    out = d / "out.jsonl"
    r = subprocess.run(cmd(opt_dir[0], d / "in.jsonl", out, d / "offload"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "30 sequences done" in r.stdout
    return out.read_bytes()


def _start(args):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(proc, cond, timeout=120):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < timeout
        time.sleep(0.005)


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_at_several_points_then_resume(opt_dir, reference, tmp_path):
    inp, out, offload = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "offload"
    write_input(inp)
    args = cmd(opt_dir[0], inp, out, offload)
    seen = []
    # 1-2: right after a block was written (the moment the line count changes).
    for _ in range(2):
        p, start = _start(args), lines(out)
        _wait(p, lambda: lines(out) > start)
        _kill(p)
        seen.append(lines(out))
    # 3: mid-block: time one block of this run, then kill half a block after the next landed.
    p, start = _start(args), lines(out)
    _wait(p, lambda: lines(out) > start)
    t1, n1 = time.time(), lines(out)
    _wait(p, lambda: lines(out) > n1)
    t2 = time.time()
    time.sleep((t2 - t1) / 2)
    _kill(p)
    seen.append(lines(out))
    # 4: during start-up, before any block.
    p = _start(args)
    time.sleep(0.5)
    _kill(p)
    seen.append(lines(out))
    assert seen == sorted(seen) and 0 < seen[0] and seen[-1] < 30, seen
    assert len(ids_in(out)) == len(set(ids_in(out)))
    # A torn last line, as a kill in the middle of a write leaves it.
    with open(out, "ab") as f:
        f.write(b'{"id": "q1", "text": "half a li')
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "torn last line" in r.stderr
    ids = ids_in(out)
    assert len(ids) == len(set(ids)) == 30
    assert out.read_bytes() == reference
    # Re-running a finished job does nothing.
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0 and "0 sequences done, 30 already in" in r.stdout
    assert out.read_bytes() == reference


def test_bad_lines_reported_and_skipped(opt_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n=3, extra=['{"id": "a", "prompt": "Paris"', '[1, 2]', '{"id": 0, "prompt": "again"}',
                                 '{"id": "b"}', '{"id": "c", "prompt": "x", "top_k": "many"}',
                                 '{"id": true, "prompt": "x"}', '{"id": "d", "prompt": "Paris is", "max_new_tokens": 2}'])
    r = subprocess.run(cmd(opt_dir[0], inp, out, tmp_path / "off", "--strict"), capture_output=True, text=True)
    assert r.returncode == 2 and not out.exists()
    assert "6 bad input line(s) (first: line 4); nothing generated (--strict)" in r.stderr
    r = subprocess.run(cmd(opt_dir[0], inp, out, tmp_path / "off"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for n, why in [(4, "not JSON"), (5, "not a JSON object"), (6, "duplicate id 0 (first on line 1)"),
                   (7, 'missing "prompt"'), (8, "top_k"), (9, '"id" must be')]:
        assert f"in.jsonl:{n}: {why}" in r.stderr
    assert "4 sequences done" in r.stdout and "6 bad input lines skipped" in r.stdout
    got = {json.loads(x)["id"]: json.loads(x) for x in out.read_text().splitlines()}
    assert list(got) == [0, "q1", "q2", "d"]              # input order
    assert got["d"]["generated_tokens"] <= 2 and got[0]["generated_tokens"] == 6


@pytest.mark.parametrize("case", ["missing-input", "missing-dir", "other-settings", "foreign-output"])
def test_one_line_errors(opt_dir, tmp_path, capsys, case):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n=2)
    args = cmd(opt_dir[0], inp, out, tmp_path / "off")[3:]
    if case == "missing-input":
        args[args.index(str(inp))] = str(tmp_path / "nope.jsonl")
    elif case == "missing-dir":
        args[args.index(str(out))] = str(tmp_path / "no" / "out.jsonl")
    elif case == "other-settings":
        assert main(args) == 0
        args[args.index("--max-new-tokens") + 1] = "9"
    else:
        out.write_text("my precious results\n")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flexgen: error: ")
    if case == "other-settings":
        assert "max_new_tokens = 6, this run has 9" in err[0]
    if case == "foreign-output":
        assert out.read_text() == "my precious results\n"


def test_logprobs_in_output(opt_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n=2)
    r = subprocess.run(cmd(opt_dir[0], inp, out, tmp_path / "off", "--logprobs", "2", "--prompt-logprobs"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for line in out.read_text().splitlines():
        obj = json.loads(line)
        assert len(obj["logprobs"]) == obj["generated_tokens"]
        assert all(len(x["top"]) == 2 and x["top"][0][1] >= x["logprob"] - 1e-6 for x in obj["logprobs"])
        assert obj["prompt_logprobs"][0] is None and len(obj["prompt_logprobs"]) == obj["prompt_tokens"]
    assert os.path.exists(str(out) + ".meta.json")
