"""Overnight use on shared disks: what clean removes, corrupt stores, memory preflight,
killed runs, concurrent first runs, output paths, the planning dtype, input checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flexgen import offload
from flexgen.errors import FlexGenError

from test_cli import assert_one_line_error, cli

PY = sys.executable
TINY = ["--percent", 0, 0, 100, 0, 100, 0, "--gpu-batch-size", 2, "--prompt-len", 8, "--gen-len", 4,
        "--dtype", "float32", "--quiet"]


def _plant(root: Path) -> list[Path]:
    """User files that look like flexgen's: none may ever be removed."""
    files = [root / "weights" / "my-finetune" / "model.safetensors", root / "notes.txt",
             root / "run-1-2-abcdefgh" / "data.bin", root / "weights" / ".build-x-1-2-abc" / "keep.txt",
             root / "run-999999-1-zzz" / "mine.txt"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("user data")
    return files


def _dead_pid() -> int:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    return p.pid


# -- 1, 7: clean ---------------------------------------------------------------------------

def test_clean_removes_only_what_flexgen_made(opt_dir, tmp_path):
    path, _ = opt_dir
    off = tmp_path / "off"
    user = _plant(off)
    assert cli("--model", path, *TINY, "--offload-dir", off).returncode == 0
    store = next(d for d in (off / "weights").iterdir() if (d / "manifest.json").is_file())
    inside = store / "my-notes.txt"
    inside.write_text("user data inside a store")
    stale = off / f"run-{_dead_pid()}-5-abcdefgh"   # a run killed before its marker was written: empty
    stale.mkdir()
    marked = off / f"run-{_dead_pid()}-7-abcdefgh"
    marked.mkdir()
    (marked / offload.RUN_MARKER).write_text("{}")
    (marked / "kv_layer_0000.bin").write_bytes(b"x" * 5000)

    dry = cli("clean", "--offload-dir", off, "--dry-run")
    assert dry.returncode == 0 and "would remove" in dry.stdout and str(store) in dry.stdout, dry.stdout
    assert store.is_dir() and marked.is_dir()

    res = cli("clean", "--offload-dir", off)
    assert res.returncode == 0, res.stderr
    assert not marked.exists() and not stale.exists()
    assert not list(store.glob("layer_*.bin")) and not (store / "manifest.json").exists()
    assert inside.read_text() == "user data inside a store" and "kept" in res.stdout
    for f in user:
        assert f.read_text() == "user data", f
    again = cli("clean", "--offload-dir", off)
    assert "(0 B)" not in again.stdout and "nothing to remove" in again.stdout
    gone = cli("clean", "--offload-dir", tmp_path / "nowhere")
    assert gone.returncode == 0 and "does not exist" in gone.stdout


def test_clean_stale_stores_of_changed_or_missing_checkpoints(opt_dir, tmp_path):
    import shutil
    src, _ = opt_dir
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    off = tmp_path / "off"
    assert cli("--model", ckpt, *TINY, "--offload-dir", off).returncode == 0
    old = {d.name for d in (off / "weights").iterdir() if d.is_dir()}
    os.utime(ckpt / "model.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    res = cli("--model", ckpt, *TINY, "--offload-dir", off)
    assert res.returncode == 0 and "checkpoint changed since weight store" in res.stderr, res.stderr
    assert cli("clean", "--stale", "--offload-dir", off).returncode == 0
    now = {d.name for d in (off / "weights").iterdir() if d.is_dir()}
    assert len(now) == 1 and not now & old       # the old store went, the current one stayed
    shutil.rmtree(ckpt)
    res = cli("clean", "--stale", "--offload-dir", off)
    assert "no longer exists" in res.stdout and not (off / "weights").exists()
    (off / "weights").mkdir()
    (off / "weights" / "never-built.lock").touch()    # a build that failed
    assert cli("clean", "--offload-dir", off).returncode == 0 and not (off / "weights").exists()


# -- 2: corrupt stores -----------------------------------------------------------------------

def _flip(store: Path, layer: int = 1) -> None:
    m = json.loads((store / "manifest.json").read_text())
    a = max(m["layers"][layer]["arrays"], key=lambda a: a["nbytes"])
    with open(store / f"layer_{layer:04d}.bin", "r+b") as f:
        f.seek(a["offset"] + a["nbytes"] // 2)
        b = f.read(4)
        f.seek(a["offset"] + a["nbytes"] // 2)
        f.write(bytes(x ^ 0x5A for x in b))


@pytest.mark.parametrize("percent", [(100, 0), (0, 0), (30, 30)], ids=["gpu", "disk", "mixed"])
def test_corrupt_store_is_an_error_not_other_tokens(opt_dir, prompts, tmp_path, percent):
    from flexgen import Policy, load_model
    path, _ = opt_dir
    ids, mask = prompts
    policy = Policy(gpu_batch_size=2, w_gpu_percent=percent[0], w_cpu_percent=percent[1])
    with load_model(str(path), policy, device="cpu", dtype="float32", offload_dir=tmp_path) as m:
        m.generate(ids, mask, max_new_tokens=2)
    store = next((tmp_path / "weights").glob("*/manifest.json")).parent
    _flip(store)
    with pytest.raises(FlexGenError, match=r"layer_0001\.bin is corrupt.*clean"):
        with load_model(str(path), policy, device="cpu", dtype="float32", offload_dir=tmp_path) as m:
            m.generate(ids, mask, max_new_tokens=2)


def test_corrupt_store_cli_and_verify(opt_dir, tmp_path):
    path, _ = opt_dir
    off = tmp_path / "off"
    assert cli("--model", path, *TINY, "--offload-dir", off).returncode == 0
    ok = cli("verify", "--offload-dir", off)
    assert ok.returncode == 0 and "ok" in ok.stdout
    _flip(next((off / "weights").glob("*/manifest.json")).parent, layer=2)
    assert_one_line_error(cli("--model", path, *TINY, "--offload-dir", off), "layer_0002.bin", "corrupt")
    assert_one_line_error(cli("verify", "--offload-dir", off), "layer_0002.bin", "corrupt")


# -- 3: memory preflight ---------------------------------------------------------------------

def test_preflight_refuses_what_does_not_fit(tmp_path):
    t = time.time()
    res = cli("--model", "opt-30b", "--dummy", "--policy", Path(__file__).parent.parent / "policies/paper_opt-30b.json",
              "--offload-dir", tmp_path / "off")
    assert_one_line_error(res, "GiB of host memory", "available", "--percent")
    assert time.time() - t < 30 and not list((tmp_path / "off").glob("run-*"))
    assert_one_line_error(cli("--model", "opt-125m", "--dummy", "--gpu-batch-size", 20000, "--prompt-len", 64,
                              "--gen-len", 16, "--offload-dir", tmp_path / "off"), "host memory")


def test_preflight_needs_match_what_a_run_holds(opt_dir, tmp_path):
    """The check's figures are the engine's: a run that fits is not refused, and its held
    bytes stay within what was predicted."""
    from flexgen import Policy, load_model
    from flexgen.preflight import needs
    path, _ = opt_dir
    policy = Policy(gpu_batch_size=2, w_gpu_percent=40, w_cpu_percent=30)
    with load_model(str(path), policy, device="cpu", dtype="float32", offload_dir=tmp_path,
                    prompt_len=8, gen_len=4) as m:
        m.generate(torch.randint(4, 300, (2, 8)), max_new_tokens=4)
        held = m.stats.peak_memory
        n = needs(m.args, policy, 8, 4, "cpu", torch.float32, 0)
    assert held["gpu"] + held["cpu"] <= n.host * 1.05 + 4096


def test_prompt_len_beyond_positions_refused_before_converting(opt_dir, tmp_path):
    path, _ = opt_dir
    assert_one_line_error(cli("--model", path, "--prompt-len", 90, "--gen-len", 10, "--offload-dir", tmp_path),
                          "positions")
    assert not (tmp_path / "weights").exists()


# -- 5: killed runs --------------------------------------------------------------------------

def _start_run(off: Path) -> subprocess.Popen:
    args = ["--model", "opt-125m", "--dummy", "--percent", 0, 0, 0, 0, 0, 0, "--gpu-batch-size", 2,
            "--prompt-len", 32, "--gen-len", 500, "--offload-dir", off, "--dtype", "float32", "--quiet"]
    proc = subprocess.Popen([PY, "-m", "flexgen", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and not list(off.glob("run-*/kv_layer_*")):
        time.sleep(0.1)
    assert list(off.glob("run-*/kv_layer_*")), "the run never reached generation"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_sighup_remove_run_files(tmp_path, sig):
    off = tmp_path / "off"
    proc = _start_run(off)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "run files removed" in err
    assert not list(off.glob("run-*"))


def test_sigkill_leftovers_removed_but_never_a_live_run(tmp_path):
    off = tmp_path / "off"
    killed = _start_run(off)
    killed.kill()
    killed.wait()
    left = list(off.glob("run-*"))
    assert len(left) == 1
    live = offload.make_run_dir(off)        # this test process: alive
    assert offload.stale_runs(off) == left
    res = cli("clean", "--stale", "--offload-dir", off)
    assert res.returncode == 0 and not left[0].exists() and live.is_dir(), res.stdout
    # A next run also removes the leftovers of a killed one.
    killed = _start_run(off)
    killed.kill()
    killed.wait()
    assert len(list(off.glob("run-*"))) == 2
    assert cli("--model", "opt-125m", "--dummy", *TINY, "--offload-dir", off).returncode == 0
    assert list(off.glob("run-*")) == [live]


def test_recycled_pid_is_not_the_dead_run(tmp_path):
    me = os.getpid()
    start = offload.process_start(me)
    assert offload.alive(me, start) and not offload.alive(me, start + 1)
    assert not offload.alive(_dead_pid(), 0) or True  # a pid may be reused at once; never raises


# -- 6: concurrent first runs ----------------------------------------------------------------

def test_two_first_runs_share_one_store(opt_dir, tmp_path):
    path, _ = opt_dir
    off = tmp_path / "off"
    outs = [tmp_path / f"r{i}.json" for i in range(3)]
    procs = [subprocess.Popen([PY, "-m", "flexgen", "--model", str(path), *map(str, TINY), "--offload-dir",
                               str(off), "--json-out", str(o)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for o in outs]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    stores = [d for d in (off / "weights").iterdir() if d.is_dir()]
    assert len(stores) == 1 and (stores[0] / "manifest.json").is_file()
    assert cli("verify", "--offload-dir", off).returncode == 0


def test_store_build_waits_for_the_builder(opt_dir, tmp_path):
    """While one process holds the build lock, another waits, then re-uses the result."""
    from flexgen.checkpoint import CheckpointSource
    from flexgen.layout import model_layouts
    from flexgen.weightstore import WeightStore
    path, _ = opt_dir
    src = CheckpointSource(path)
    key = WeightStore.key(src, torch.float32, False)
    (tmp_path / "weights").mkdir()
    lk = offload.lock(tmp_path / "weights" / f"{key}.lock")
    proc = subprocess.Popen([PY, "-m", "flexgen", "--model", str(path), *map(str, TINY), "--offload-dir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()   # blocks until the process reaches the lock
    assert "waiting for another process" in first and proc.poll() is None, first
    layouts = model_layouts(src.args, torch.float32, False)
    weights = tmp_path / "weights"
    offload._build(weights, key, weights / key, lambda tmp: WeightStore(tmp, layouts)._build(src, False))
    ours = (weights / key / "manifest.json").stat().st_ino
    lk.release()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert (weights / key / "manifest.json").stat().st_ino == ours   # it re-used the store, no rebuild
    assert not list((tmp_path / "weights").glob(".build-*"))



def test_store_layers_are_on_disk_and_out_of_the_page_cache_before_the_manifest(opt_dir, tmp_path, monkeypatch):
    """A built store's layer files are fsynced and dropped from the page cache, each before
    the manifest marks the store complete: no dirty pages left for the run's first O_DIRECT
    reads to flush, none counted against a memory cgroup."""
    from flexgen.checkpoint import CheckpointSource
    from flexgen.layout import model_layouts
    from flexgen.weightstore import WeightStore
    path, _ = opt_dir
    src = CheckpointSource(path)
    layouts = model_layouts(src.args, torch.float32, False)
    synced, dropped = [], []
    fsync, fadvise = os.fsync, os.posix_fadvise

    def on_fsync(fd):
        fsync(fd)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (tmp_path / "manifest.json").exists()))

    def on_fadvise(fd, offset, length, advice):
        fadvise(fd, offset, length, advice)
        if advice == os.POSIX_FADV_DONTNEED and (offset, length) == (0, 0):
            dropped.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", on_fsync)
    monkeypatch.setattr(os, "posix_fadvise", on_fadvise)
    store = WeightStore(tmp_path, layouts)
    store._build(src, False)
    layers = [str(store.layer_path(i).resolve()) for i in range(len(layouts))]
    assert (tmp_path / "manifest.json").is_file()
    assert [p for p, _ in synced if p in layers] == layers and not any(done for _, done in synced)
    assert [p for p in dropped if p in layers] == layers


# -- 8: output paths -------------------------------------------------------------------------

def test_unwritable_outputs_fail_before_the_work(tmp_path):
    t = time.time()
    res = cli("--model", "opt-125m", "--dummy", *TINY, "--offload-dir", tmp_path / "off",
              "--json-out", "/proc/nope/r.json")
    assert_one_line_error(res, "--json-out", "/proc/nope/r.json")
    assert "total" not in res.stdout and not (tmp_path / "off").exists()
    assert_one_line_error(cli("policy", "--model", "opt-1.3b", "--hardware", "t4", "--save", "/proc/x.json"),
                          "/proc/x.json")
    assert_one_line_error(cli("profile", "--quick", "--out", tmp_path / "hw.json", "--offload-dir", "/proc/x"),
                          "/proc/x")
    assert time.time() - t < 60


def test_json_out_written_atomically(tmp_path):
    from flexgen.outputs import write_atomic
    out = tmp_path / "r.json"
    out.write_text("old")
    write_atomic(out, "new")
    assert out.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


# -- 9: the optimizer plans with the engine's dtype ------------------------------------------

def test_policy_plans_with_engine_dtype(tmp_path):
    from flexgen.device import default_dtype, dtype_name
    from flexgen.optimizer import load_hardware
    fp32 = load_hardware("t4").replace(compute_device="cpu", compute_dtype="float32", unified_memory=True)
    f = tmp_path / "hw.json"
    fp32.save(f)
    engine = dtype_name(default_dtype(torch.device("cpu")))
    res = cli("policy", "--model", "opt-1.3b", "--hardware", f, "--percent", 100, 0, 100, 0, 100, 0,
              "--gpu-batch-size", 1, "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)["memory"]["gpu"]
    res32 = cli("policy", "--model", "opt-1.3b", "--hardware", f, "--percent", 100, 0, 100, 0, 100, 0,
                "--gpu-batch-size", 1, "--json", "--dtype", "float32")
    want = json.loads(res32.stdout)["memory"]["gpu"] * (0.5 if engine == "bfloat16" else 1.0)
    assert abs(got - want) / want < 0.05
    from flexgen.calibrate import pick_cpu_dtype
    assert pick_cpu_dtype(quick=True) == engine


# -- 12: smaller things ----------------------------------------------------------------------

def test_help_shows_length_defaults_and_policy_file_disagreement_warns(tmp_path):
    h = cli("--help").stdout
    assert "default: the --policy file's, else 512" in " ".join(h.split())
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps({"policy": {"gpu_batch_size": 1}, "model": "opt-6.7b", "prompt_len": 9,
                               "gen_len": 3}))
    res = cli("--model", "opt-125m", "--dummy", "--policy", pol, "--prompt-len", 8, "--gen-len", 3,
              "--dtype", "float32", "--quiet", "--offload-dir", tmp_path / "off")
    assert res.returncode == 0, res.stderr
    assert "planned for prompt len 9" in res.stderr and "planned for model opt-6.7b" in res.stderr
    assert "gen len" not in res.stderr
    sugg = cli("policy", "--model", "opt-1.3b", "--hardware", "t4", "--prompt-len", 64, "--gen-len", 8)
    assert "--prompt-len 64 --gen-len 8" in sugg.stdout


def test_bad_input_ids_and_closed_model(opt_dir, tmp_path):
    from flexgen import Policy, load_model
    path, _ = opt_dir
    m = load_model(str(path), Policy(gpu_batch_size=2), device="cpu", dtype="float32", offload_dir=tmp_path)
    with m:
        for bad, needle in ((torch.zeros(0, 4, dtype=torch.long), "batch >= 1"),
                            (torch.ones(2, 4), "integer token ids")):
            with pytest.raises(FlexGenError, match=needle):
                m.generate(bad, max_new_tokens=2)
        ids = torch.randint(4, 300, (2, 5))
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        with pytest.raises(FlexGenError, match="left-padded"):
            m.generate(ids, mask, max_new_tokens=2)
    with pytest.raises(FlexGenError, match="closed"):
        m.generate(ids, max_new_tokens=2)


def test_budget_beyond_the_machine_is_said(tmp_path):
    from flexgen.optimizer import load_hardware
    f = tmp_path / "hw.json"
    load_hardware("t4").replace(cpu_mem=4 << 30, cpu_reserved=1 << 30).save(f)
    res = cli("--model", "opt-125m", "--dummy", "--gpu-mem", 2, "--cpu-mem", 5, "--hardware", f, "--dry-run",
              "--prompt-len", 64, "--gen-len", 8, "--offload-dir", tmp_path / "off")
    assert "--cpu-mem 5 is more than this machine has for tensors" in res.stderr, res.stderr
    assert "planning with 3.0 GiB" in res.stderr, res.stderr
    res = cli("--model", "opt-125m", "--dummy", "--gpu-mem", 2, "--cpu-mem", 2, "--hardware", f, "--dry-run",
              "--prompt-len", 64, "--gen-len", 8, "--offload-dir", tmp_path / "off")
    assert "warning" not in res.stderr, res.stderr


# -- 11: progress --------------------------------------------------------------------------

def _run_on_tty(args) -> str:
    import pty
    import select
    import fcntl
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a new pty is 0 wide
    proc = subprocess.Popen([PY, "-m", "flexgen", *map(str, args)], stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        r, _, _ = select.select([master], [], [], 120)
        try:
            chunk = os.read(master, 4096) if r else b""
        except OSError:  # the child closed its end
            chunk = b""
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    os.close(master)
    return out.decode(errors="replace")


def test_progress_bar_on_a_terminal_only(opt_dir, tmp_path):
    args = ["--model", opt_dir[0], "--percent", 100, 0, 100, 0, 100, 0, "--gpu-batch-size", 2,
            "--prompt-len", 8, "--gen-len", 6, "--dtype", "float32", "--offload-dir", tmp_path]
    shown = _run_on_tty(args)
    assert "generating" in shown and "tok/s" in shown and "/12 [" in shown, shown
    assert "generating" not in _run_on_tty(args + ["--quiet"])
    assert "generating" not in cli(*args).stderr     # not a terminal


# -- where the time went: waits by kind, I/O threads' busy time --------------------------

def _slowed(monkeypatch, cls, name, seconds):
    real = getattr(cls, name)

    def slow(*a, **kw):
        time.sleep(seconds)
        return real(*a, **kw)
    monkeypatch.setattr(cls, name, slow)


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_waits_by_kind_and_io_busy_time_name_the_slow_link(opt_dir, tmp_path, monkeypatch, overlap):
    """A cache read and a cache write made 50 ms slower show up as the cache's wait (when
    nothing hides it) and as the I/O threads' busy time for those kinds, not elsewhere."""
    from flexgen import Policy, load_model
    from flexgen.cli import time_breakdown
    from flexgen.kvcache import KVSlot
    path, _ = opt_dir
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=0,
                    cache_gpu_percent=0, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0,
                    overlap=overlap)
    delay, gen, layers, ngb = 0.05, 4, 2, 2
    with load_model(str(path), policy, device="cpu", dtype="float32", offload_dir=tmp_path) as m:
        _slowed(monkeypatch, KVSlot, "begin", delay)
        _slowed(monkeypatch, KVSlot, "end", delay)
        m.generate(torch.randint(4, 300, (4, 8)), max_new_tokens=gen, eos_token_id=[])
        t = dict(m.stats.timings)
    for ph in ("prefill", "decode"):
        kinds = sum(t.get(f"{ph}.wait.{k}", 0.0) for k in ("weights", "cache", "hidden"))
        assert kinds == pytest.approx(t[ph + ".wait"], rel=1e-6, abs=1e-9)
    # Every (step, layer, batch) begins and ends once. I/O time counts under the phase
    # running when it was spent: a prefetch for the first decode step may end in prefill.
    per_kind = gen * layers * ngb
    for kind in ("load_cache", "store_cache"):
        assert t.get(f"prefill.io.{kind}", 0.0) + t[f"decode.io.{kind}"] >= delay * per_kind
    assert t["decode.io.load_weights"] > 0 and "decode.io.load_hidden" not in t   # hidden is resident
    if not overlap:   # every decode load is waited for in full
        assert t["decode.wait.cache"] >= delay * (gen - 1) * layers * ngb
        assert t["decode.wait.cache"] > t["decode.wait.weights"]
    text = time_breakdown(t, "decode")
    assert f"cache {t['decode.wait.cache']:.1f}" in text and f"load cache {t['decode.io.load_cache']:.1f} s" in text


def test_stores_behind_a_slow_disk_do_not_pile_up(opt_dir, tmp_path, monkeypatch):
    """Each queued store keeps its tensors: when writes fall behind compute, compute waits
    for the oldest instead of letting them (and memory) grow without bound."""
    from flexgen import Policy, iopool, load_model, scheduler
    from flexgen.kvcache import KVSlot
    path, _ = opt_dir
    in_flight, most = [0], [0]
    real_submit = iopool.IOPool.submit

    def submit(self, fn, *args, store=False, **kw):
        fut = real_submit(self, fn, *args, store=store, **kw)
        if store:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])

            def done(_):
                in_flight[0] -= 1
            fut.add_done_callback(done)
        return fut
    monkeypatch.setattr(iopool.IOPool, "submit", submit)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=4, w_gpu_percent=100, w_cpu_percent=0,
                    cache_gpu_percent=0, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0)
    with load_model(str(path), policy, device="cpu", dtype="float32", offload_dir=tmp_path) as m:
        _slowed(monkeypatch, KVSlot, "end", 0.1)      # a disk much slower than compute
        m.generate(torch.randint(4, 300, (8, 8)), max_new_tokens=4, eos_token_id=[])
        t = dict(m.stats.timings)
    # 4 steps x 2 layers x 4 batches = 32 stores of 0.1 s against milliseconds of compute.
    # The newest store is queued before the oldest is waited for, and a done callback may lag.
    assert most[0] <= scheduler.MAX_PENDING_STORES + 2
    assert t["prefill.wait.stores"] + t["decode.wait.stores"] > 0.5 * 32 * 0.1


# -- 10: compressed weights are dequantized off the compute thread -------------------------

@pytest.mark.parametrize("percent", [(100, 0), (20, 30)], ids=["gpu", "mixed"])
def test_dequantize_runs_on_the_loader_not_the_compute_thread(opt_dir, tmp_path, monkeypatch, percent):
    import threading

    from flexgen import Policy, load_model, quant
    path, _ = opt_dir
    threads = []
    orig = quant.dequantize

    def spy(p, *a, **kw):
        threads.append(threading.current_thread().name)
        return orig(p, *a, **kw)

    monkeypatch.setattr(quant, "dequantize", spy)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=percent[0], w_cpu_percent=percent[1],
                    compress_weight=True)
    with load_model(str(path), policy, device="cpu", dtype="float32", offload_dir=tmp_path) as m:
        m.generate(torch.randint(4, 300, (4, 8)), max_new_tokens=3, eos_token_id=[])
        t = m.stats.timings
    layers = 2 * 2  # attention + mlp per block
    assert len(threads) >= 3 * layers and all(n.startswith("flexgen-") for n in threads), set(threads)
    # Each layer once per token step, not once per gpu batch.
    assert len(threads) <= 3 * (layers + 2) * 4
    assert set(t) >= {"prefill.compute", "prefill.wait", "decode.compute", "decode.wait"}


def test_disk_bandwidth_probe_reads_with_the_engines_load_threads(tmp_path):
    """The probe times reads with several readers over parts of one file (as the engine's
    load threads read), returns positive rates and leaves nothing behind."""
    from flexgen.calibrate import disk_bandwidth
    for readers in (1, 3):
        read, write, note = disk_bandwidth(tmp_path, 24 << 20, readers=readers)
        assert read > 0 and write > 0 and note.startswith("disk:")
        assert list(tmp_path.iterdir()) == []


def test_disk_bandwidth_probe_reads_into_working_buffers_not_one_block(monkeypatch, tmp_path):
    """Each reader's pieces land in turn in two halves of a buffer, as the engine's reads
    fill its two working buffers: reading every block into one small buffer timed the
    disk 1.3-1.45x faster than the engine reads it. Writes leave from two halves too."""
    import ctypes

    from flexgen import calibrate
    from flexgen.diskio import READ_PIECE
    seen = {"read": [], "write": []}
    real_preadv, real_write = os.preadv, os.write

    def addr(buf) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))

    def preadv(fd, bufs, offset):
        seen["read"].append((offset, addr(bufs[0]), len(bufs[0])))
        return real_preadv(fd, bufs, offset)

    def write(fd, buf):
        if isinstance(buf, memoryview):
            seen["write"].append((None, addr(buf), len(buf)))
        return real_write(fd, buf)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "write", write)
    calibrate.disk_bandwidth(tmp_path, 4 * READ_PIECE, readers=1, repeats=1)
    for kind in ("read", "write"):
        calls = seen[kind]
        assert len(calls) == 4 and all(n == READ_PIECE for _, _, n in calls), kind
        addrs = [a for _, a, _ in calls]
        assert addrs[0] == addrs[2] and addrs[1] == addrs[3], kind
        assert abs(addrs[1] - addrs[0]) == READ_PIECE, kind
    assert sorted(o for o, _, _ in seen["read"]) == [i * READ_PIECE for i in range(4)]


def test_disk_bandwidth_is_the_median_of_repeats(monkeypatch, tmp_path):
    """One outlying measurement (a read back served at twice the disk's speed) does not
    become the profile's figure: read and write are each the median of the repeats."""
    from flexgen import calibrate
    runs = iter([(1.2e9, 2.0e9, "disk: O_DIRECT"), (2.6e9, 1.8e9, "disk: O_DIRECT"), (1.1e9, 2.4e9, "disk: O_DIRECT")])
    seen = []
    monkeypatch.setattr(calibrate, "_disk_bandwidth_once", lambda d, n, r: seen.append((d, n, r)) or next(runs))
    read, write, note = calibrate.disk_bandwidth(tmp_path, 8 << 20, readers=2)
    assert (read, write, note) == (1.2e9, 2.0e9, "disk: O_DIRECT")
    assert seen == [(tmp_path, 8 << 20, 2)] * 3


def test_dequant_rate_times_dequantization_into_a_reused_output(monkeypatch):
    """The profile times dequantization as the engine runs it, into one output buffer kept
    across calls: timing a fresh output per call measured its page faults (~5x slower)."""
    import torch

    from flexgen import calibrate, quant
    outs = []
    real = quant.dequantize

    def spy(p, dtype=None, out=None):
        outs.append(out)
        return real(p, dtype, out=out)
    monkeypatch.setattr(quant, "dequantize", spy)
    assert calibrate.dequant_rate(torch.device("cpu"), torch.float32, 1 << 16) > 0
    # Two layouts (weights, KV cache), each into its own output, reused on every call.
    assert len(outs) > 2 and all(o is not None for o in outs)
    assert len({id(o) for o in outs}) == 2
    assert outs[0].dim() == 2 and outs[1].dim() == 3
    assert all(o is outs[i % 2] for i, o in enumerate(outs))


def test_matmul_by_rows_cycles_weights_larger_than_the_last_level_cache(monkeypatch):
    """A layer's weights come from memory, not from a cache that one weight timed over and
    over would stay in: the profile cycles through distinct weights that exceed the cache."""
    import torch

    from flexgen import calibrate
    k, n = 64, 128
    one = k * n * 4
    monkeypatch.setattr(calibrate, "last_level_cache", lambda device: 3 * one)
    seen = {}
    real = torch.nn.functional.linear

    def spy(a, w, *rest):
        seen.setdefault(a.shape[0], set()).add(id(w))
        return real(a, w, *rest)
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    table = calibrate.matmul_by_rows(torch.device("cpu"), torch.float32, rows=(1, 8), k=k, n=n)
    assert [r for r, _ in table] == [1, 8] and all(v > 0 for _, v in table)
    for rows in (1, 8):
        assert len(seen[rows]) * one > 3 * one   # together larger than the cache
    monkeypatch.setattr(calibrate, "last_level_cache", lambda device: 0)   # unknown: still two
    seen.clear()
    calibrate.matmul_by_rows(torch.device("cpu"), torch.float32, rows=(4,), k=k, n=n)
    assert len(seen[4]) == 2


def test_last_level_cache_is_the_largest_cpu_cache():
    import torch

    from flexgen.calibrate import last_level_cache
    size = last_level_cache(torch.device("cpu"))
    caches = Path("/sys/devices/system/cpu/cpu0/cache")
    if not caches.is_dir():
        assert size == 0
        return
    kib = [int(f.read_text().strip().rstrip("K")) for f in caches.glob("index*/size")
           if f.read_text().strip().endswith("K")]
    assert size >= max(kib, default=0) << 10
