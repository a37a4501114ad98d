"""flexgen vs Accelerate vs the original FlexGen on one GPU under a 16 GB cap, one call per model.

    python benchmarks/gpu_compare.py --fetch-original shared/original     # here, with PyPI access
    PYTHONPATH=. python benchmarks/gpu_compare.py --model opt-30b --original shared/original --record
    python benchmarks/gpu_compare.py --self-test                           # no CUDA: every path, small

Each system runs in its own process, which first caps CUDA memory with
`torch.cuda.set_per_process_memory_fraction(16 GiB / device memory)`; each gets a slice of
`--budget` seconds (default 540, one 10-minute device call), and one that runs out of
time, memory or policy is a row saying so. Dummy (random) weights everywhere, prompt 512,
gen 32 by default (the paper's workload); throughput = generated tokens / (prefill + decode).

  flexgen         the optimizer's policy for --gpu-mem 16 (cpu and disk budgets: this
                  machine's free RAM and disk; 4-bit compression only when nothing fits in fp16)
  flexgen-paper   the paper's policy (policies/paper_<model>.json), its block shrunk only
                  when its host memory (weights + KV cache) exceeds 75% of this machine's RAM
  original        PyPI flexgen 0.1.8 with `--path _DUMMY_` and the paper's published policy
                  (shrunk the same way), in its own virtual environment (--system-site-packages:
                  it reuses torch and transformers) through benchmarks/original_flexgen_run.py
  accelerate      OPTForCausalLM under init_empty_weights, weights materialised in host memory
                  (fp16, normal(0, 0.02), norms 1, biases 0), dispatch_model with
                  infer_auto_device_map(max_memory={0: cap minus the batch's KV cache and
                  activations, "cpu": ...}); batch sizes largest first, the best reported. When its
                  slice runs short, decode time is projected from the steps done (as the
                  original's --cut-gen-len does) and the row says so.

The GPU machine has no network: `--fetch-original DIR` (run where PyPI is reachable)
downloads the flexgen 0.1.8 wheel and the pure-Python wheels it or the optimizer may lack
(attrs, pulp) into DIR; carry DIR with the device call (shared/original is git-ignored).
For OPT-30B the target is checked: flexgen >= the original and >= 10x Accelerate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GIB = 1 << 30
MODELS = ("opt-6.7b", "opt-30b", "opt-175b")
SYSTEMS = ("flexgen", "original", "accelerate", "flexgen-paper")
# Shares of the time left, among the systems still to run (what one leaves goes to the next):
# flexgen also generates its dummy weights in its slice; the paper's-policy row is extra.
SLICE_WEIGHT = {"flexgen": 1.3, "original": 1.1, "accelerate": 1.0, "flexgen-paper": 0.6}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, vocab_size=1000,
            max_position_embeddings=256)


# -- shared helpers -------------------------------------------------------------------

def host_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def hf_config(model: str) -> dict:
    """The Hugging Face OPT config of a named size, or the self-test's tiny one."""
    if model == "tiny":
        return dict(model_type="opt", architectures=["OPTForCausalLM"], word_embed_proj_dim=64,
                    do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                    activation_function="relu", enable_bias=True, tie_word_embeddings=True, **TINY)
    sys.path.insert(0, str(ROOT))
    from flexgen.models.registry import args_from_name
    cfg = args_from_name(model).to_hf_config()
    cfg.setdefault("model_type", "opt")
    return cfg


def sizes(cfg: dict, batch: int, seq: int) -> tuple[int, int]:
    """fp16 bytes of the weights and of the KV cache of `batch` sequences of `seq` tokens."""
    h, L, f = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["ffn_dim"]
    params = L * (4 * h * h + 2 * h * f + 9 * h + f) + (cfg["vocab_size"] + cfg["max_position_embeddings"]) * h
    return 2 * params, 2 * 2 * L * h * batch * seq


def fit_block(cfg, gbs, ngb, w_cpu, c_cpu, prompt, gen, ram):
    """Shrink a block (num_gpu_batches first, then the gpu batch) until the host part of
    weights + KV cache is at most 75% of RAM; (gbs, ngb, host bytes)."""
    while True:
        w, c = sizes(cfg, gbs * ngb, prompt + gen)
        need = w * w_cpu / 100 + c * c_cpu / 100
        if need <= 0.75 * ram or (gbs == 1 and ngb == 1):
            return gbs, ngb, need
        if ngb > 1:
            ngb -= 1
        else:
            gbs //= 2


def cap_gpu(cap_gib: float):
    import torch
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
        torch.cuda.reset_peak_memory_stats()


def gpu_peak():
    import torch
    return torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None


def paper_policy(model: str) -> dict:
    p = ROOT / "policies" / f"paper_{model}.json"
    return json.loads(p.read_text()) if p.is_file() else {}


# -- children: one system each ---------------------------------------------------------

T0 = time.perf_counter()


def phase(msg: str) -> None:
    """A child's progress line, in its log: a child killed at its time limit still says
    how far it got and how long each part took."""
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def child_flexgen(a) -> dict:
    import dataclasses

    import torch
    sys.path.insert(0, str(ROOT))
    import flexgen
    from flexgen.autopolicy import choose_policy
    from flexgen.errors import FlexGenError
    from flexgen.optimizer.cli import model_args_for

    if torch.cuda.is_available():
        from flexgen.device import prefer_expandable_segments
        prefer_expandable_segments()   # before CUDA starts, as flexgen's own CLI does
    cap_gpu(a.gpu_cap_gib)
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    model = a.model
    if model == "tiny":
        d = Path(a.scratch) / "tiny"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(hf_config("tiny")))
        model = str(d)
    off = Path(a.scratch) / "offload"
    off.mkdir(parents=True, exist_ok=True)
    out = {"system": a.system}
    if a.system == "flexgen":
        hw = a.hardware
        if hw is None:
            from flexgen.calibrate import measure_hardware
            hw = measure_hardware(off, quick=True)
            phase("hardware profile measured")
        if not isinstance(hw, str):   # what the optimizer saw, for the record
            out["hardware"] = {k: v for k, v in hw.to_dict().items() if k.endswith(("_bw", "_flops", "_rate"))
                               or k in ("gpu_reserved", "layer_overhead")}
            phase(f"profile: {out['hardware']}")
        args = model_args_for(model)
        note = ""
        try:
            choice = choose_policy(args, a.prompt_len, a.gen_len, offload_dir=off, gpu_mem=a.gpu_cap_gib,
                                   hardware=hw, device=dev, dtype=dtype, log=lambda m: None)
        except FlexGenError:
            choice = choose_policy(args, a.prompt_len, a.gen_len, offload_dir=off, gpu_mem=a.gpu_cap_gib,
                                   hardware=hw, device=dev, dtype=dtype, compress_weight=True, compress_cache=True,
                                   log=lambda m: None)
            note = "4-bit (no fp16 policy fits); "
        policy = choice.policy
        phase(f"policy chosen: {policy.to_dict()}; predicted {choice.estimate.throughput:.2f} token/s")
        out.update(predicted_tok_s=choice.estimate.throughput, note=note + "optimizer, --gpu-mem "
                   f"{a.gpu_cap_gib:g}")
    else:
        data = json.loads(a.policy_json)
        policy = flexgen.Policy(**data["policy"])
        policy = dataclasses.replace(policy, gpu_batch_size=a.gbs, num_gpu_batches=a.ngb)
        out["note"] = a.note
    out["policy"] = policy.to_dict()
    block = policy.block_size
    ids = torch.randint(4, 1000 - 1, (block, a.prompt_len), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with flexgen.load_model(model, policy, device=dev, dtype=dtype, dummy=True, offload_dir=off,
                            gpu_mem=a.gpu_cap_gib * GIB if cuda else None, prompt_len=a.prompt_len,
                            gen_len=a.gen_len) as m:
        out["load_s"] = time.perf_counter() - t0   # dummy weights generated and placed
        phase(f"weights generated and placed: block {block}, pinned {m.device.pinned_bytes / GIB:.1f} GiB")
        m.generate(ids[:, :min(32, a.prompt_len)], max_new_tokens=1, eos_token_id=[])   # warm-up, as the original
        phase("warm-up done")
        m.generate(ids, max_new_tokens=a.gen_len, eos_token_id=[])
        s = m.stats
        phase(f"generated: prefill {s.prefill_time:.1f} s, decode {s.decode_time:.1f} s")
        out.update(batch=block, prefill_s=s.prefill_time, decode_s=s.decode_time, generated=s.generated_tokens,
                   throughput=s.throughput, peak_gpu=gpu_peak(), engine_peak=dict(s.peak_memory))
    return out


class _Stop(Exception):
    pass


class StepClock:
    """generate() streamer: the first put() is the prompt, then one per new token; past the
    deadline (with at least one decode step done) generation stops, to be projected."""

    def __init__(self, deadline: float):
        self.times, self.deadline = [], deadline

    def put(self, value):
        self.times.append(time.perf_counter())
        phase("prompt queued" if len(self.times) == 1 else f"token step {len(self.times) - 1}")
        if len(self.times) >= 3 and self.times[-1] > self.deadline:
            raise _Stop

    def end(self):
        pass


def child_accelerate(a) -> dict:
    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.hooks import remove_hook_from_submodules
    from transformers import OPTConfig, OPTForCausalLM

    t_start = time.perf_counter()
    deadline = t_start + a.slice_s - 15
    cap_gpu(a.gpu_cap_gib)
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    cfg_d = hf_config(a.model)
    cfg = OPTConfig(**{k: v for k, v in cfg_d.items() if k not in ("model_type", "architectures")})
    with init_empty_weights():
        skeleton = OPTForCausalLM(cfg)
    # Materialise once in host memory; every try loads these same tensors (no copy).
    # Matrices: a 16M-value block of normal(0, 0.02) copied over and over (a memcpy, not 30B
    # random draws); the values do not change the time of a dense model.
    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    sd = {}
    for name, p in skeleton.named_parameters():
        t = torch.empty(p.shape, dtype=dtype)
        if name.endswith("bias"):
            t.zero_()
        elif p.dim() == 1:
            t.fill_(1.0)
        else:
            flat = t.view(-1)
            for i in range(0, flat.numel(), pool.numel()):
                n = min(pool.numel(), flat.numel() - i)
                flat[i:i + n].copy_(pool[:n])
        sd[name] = t
    del skeleton
    out = {"system": "accelerate", "materialise_s": time.perf_counter() - t_start, "tried": {}}
    phase("weights materialised in host memory")
    w_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    best = None
    for b in a.batches:
        left = deadline - time.perf_counter()
        if best is not None and left < 1.3 * best["wall_s"]:
            out["tried"][str(b)] = "skipped: time"
            continue
        if left < 20:
            out["tried"][str(b)] = "skipped: time"
            continue
        kv = 2 * L * h * b * (a.prompt_len + a.gen_len) * 2
        act = b * a.prompt_len * max(4 * h, cfg.ffn_dim) * 2 * 3 + b * a.prompt_len * cfg.vocab_size * 4
        gpu_w = a.gpu_cap_gib * GIB - kv - act - 1.5 * GIB
        if cuda and gpu_w < 0.5 * GIB:
            out["tried"][str(b)] = f"skipped: KV cache + activations leave {gpu_w / GIB:.1f} GiB for weights"
            continue
        with init_empty_weights():
            model = OPTForCausalLM(cfg)
        model.load_state_dict(sd, strict=False, assign=True)
        model.tie_weights()
        model.eval()
        cpu_budget = int(host_ram() * 0.9)
        max_memory = {0: int(gpu_w), "cpu": cpu_budget} if cuda else {"cpu": cpu_budget}
        dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["OPTDecoderLayer"],
                                     dtype=dtype)
        ids = torch.randint(4, cfg.vocab_size - 1, (b, a.prompt_len), generator=torch.Generator().manual_seed(1))
        dev = "cuda:0" if cuda else "cpu"
        ids = ids.to(dev)
        r = {"batch": b, "device_map": {str(d): sum(1 for v in dmap.values() if v == d) for d in set(dmap.values())},
             "gpu_weight_budget_gib": round(gpu_w / GIB, 2)}
        t0 = time.perf_counter()
        phase(f"batch {b}: device map {r['device_map']}")
        try:
            model = dispatch_model(model, device_map=dmap)
            phase(f"batch {b}: dispatched")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                if best is None:   # warm-up, as the other systems do
                    model.generate(ids[:, :32], max_new_tokens=1, do_sample=False, pad_token_id=1)
                clock = StepClock(deadline)
                t1 = time.perf_counter()
                try:
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.gen_len,
                                   min_new_tokens=a.gen_len, do_sample=False, pad_token_id=1, streamer=clock)
                except _Stop:
                    pass
            ts = clock.times
            if len(ts) < 2:
                raise RuntimeError("no token generated")
            steps = len(ts) - 2
            prefill = ts[1] - t1
            decode = (ts[-1] - ts[1]) / steps * (a.gen_len - 1) if steps else 0.0
            r.update(prefill_s=prefill, decode_s=decode, generated=b * a.gen_len,
                     throughput=b * a.gen_len / (prefill + decode), peak_gpu=gpu_peak())
            if steps + 1 < a.gen_len:
                r["note"] = f"decode projected from {steps} of {a.gen_len - 1} steps (time)"
            out["tried"][str(b)] = round(r["throughput"], 3)
            if best is None or r["throughput"] > best["throughput"]:
                best = r
        except torch.cuda.OutOfMemoryError as e:
            out["tried"][str(b)] = f"OOM: {str(e)[:80]}"
        finally:
            r["wall_s"] = time.perf_counter() - t0
            remove_hook_from_submodules(model)
            del model
            if cuda:
                torch.cuda.empty_cache()
    out["weights_gib"] = round(w_bytes / GIB, 2)
    if best is None:
        out["failed"] = "no batch size ran: " + "; ".join(f"{k}: {v}" for k, v in out["tried"].items())
        return out
    out.update(best)
    return out


def run_logged(cmd: list, timeout: float, log: Path, env=None, cwd=None):
    """Run `cmd` with its output in the file `log`, which is kept: (exit code or "timeout",
    the log's non-empty lines)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=cwd).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log.read_text(errors="replace").replace("\r", "\n")
    return rc, [ln for ln in text.splitlines() if ln.strip()]


def failure(rc, lines: list, timeout: float) -> dict:
    """A row's failure from a child's exit and log: which limit, and the last thing it said."""
    last = lines[-1][:200] if lines else ""
    if rc == "timeout":
        why = f"out of time ({timeout:.0f} s slice)"
    else:
        oom = any("OutOfMemory" in ln or "out of memory" in ln.lower() for ln in lines)
        why = "out of memory" if oom or rc in (-9, 137) else f"exit {rc}"
    return {"failed": f"{why}; last: {last}" if last else why, "log_tail": "\n".join(lines[-15:])}


def run_child(cmd: list, timeout: float, system: str, log: Path, env=None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_json = f.name
    t0 = time.perf_counter()
    rc, lines = run_logged(cmd + ["--out", out_json], timeout, log, env=env)
    wall = time.perf_counter() - t0
    try:
        res = json.loads(Path(out_json).read_text())
    except (OSError, json.JSONDecodeError):
        res = failure(rc, lines, timeout)
    finally:
        Path(out_json).unlink(missing_ok=True)
    res.setdefault("system", system)
    res["wall_s_total"] = wall
    return res


# -- the original FlexGen: fetch here, install there -------------------------------------

def fetch_original(d: Path) -> int:
    d.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(d)]
    subprocess.run(pip + ["flexgen==0.1.8"], check=True)
    (d / "deps").mkdir(exist_ok=True)
    # Pure-Python wheels the GPU machine may lack: attrs (the original's utils), pulp (the optimizer).
    subprocess.run(pip[:-1] + [str(d / "deps"), "--only-binary", ":all:", "attrs", "pulp"], check=True)
    (d / "README").write_text("Wheels for benchmarks/gpu_compare.py --original, for a machine without network (git-ignored).\n"
                              "flexgen-0.1.8: the original FlexGen; deps/: attrs (its utils), pulp (the optimizer).\n"
                              "The tokenizer is built at run time (benchmarks/original_flexgen_run.py).\n")
    print(f"fetched into {d}: " + ", ".join(p.name for p in sorted(d.rglob("*.whl"))))
    return 0


def original_python(d: Path, log) -> str:
    """A venv (system site packages: torch, transformers) holding the original wheel; its python."""
    wheels = sorted(d.glob("flexgen-0.1.8*.whl"))
    if not wheels:
        raise RuntimeError(f"no flexgen-0.1.8 wheel in {d} (run --fetch-original {d} where PyPI is reachable)")
    venv = Path(tempfile.gettempdir()) / "flexgen-original-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        r = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], capture_output=True,
                           text=True)
        if r.returncode != 0:   # no ensurepip here: a venv without pip, filled by this interpreter's pip
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                           check=True)
    # --system-site-packages gives the base interpreter's packages; when this one is itself a
    # venv, its packages (torch, transformers) are added by a .pth, after the venv's own.
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import site as site_mod
    outer = [p for p in site_mod.getsitepackages() if Path(p).is_dir()]
    Path(site, "zz_outer_site.pth").write_text("\n".join(outer) + "\n")
    has_pip = subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True).returncode == 0
    extra = [str(w) for w in sorted((d / "deps").glob("attrs-*.whl"))]
    attrs_ok = subprocess.run([str(py), "-c", "import attr"], capture_output=True).returncode == 0
    todo = [str(wheels[-1])] + ([] if attrs_ok else extra)
    if has_pip:
        cmd = [str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", *todo]
    else:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site, *todo]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    log(f"original: {py} ({'pip' if has_pip else 'no pip in the venv: installed with --target'})")
    return str(py)


def original_cmd(a, pol: dict, gbs: int, ngb: int, scratch: Path, check: bool) -> list:
    flags = ["--model", f"facebook/{a.model if a.model != 'tiny' else 'opt-125m'}", "--path", "_DUMMY_",
             "--offload-dir", str(scratch / "orig-offload"), "--prompt-len", str(a.prompt_len),
             "--gen-len", str(a.gen_len), "--percent", *[str(int(x)) for x in pol["percent"]],
             "--gpu-batch-size", str(gbs), "--num-gpu-batches", str(ngb)]
    if "cpu_cache_compute" in pol.get("flags", []):
        flags.append("--cpu-cache-compute")
    if "no_pin_weight" in pol.get("flags", []):
        flags += ["--pin-weight", "0"]
    if a.original_cut_gen:
        flags += ["--cut-gen-len", str(a.original_cut_gen)]
    own = ["--gpu-cap-gib", str(a.gpu_cap_gib)] + (["--check"] if check else [])
    return [str(HERE / "original_flexgen_run.py"), *own, "--", *flags]


# -- the parent ------------------------------------------------------------------------

def feasibility(system: str, a, cfg: dict, ram: int, disk: int):
    """None if the system may run; else why not (in words)."""
    w, _ = sizes(cfg, 1, 1)
    if system == "accelerate" and w > 0.85 * ram:
        return (f"skipped: {w / GIB:.0f} GiB of fp16 weights exceed host RAM ({ram / GIB:.0f} GiB); it needs "
                "disk offload beyond this machine's disk")
    if system in ("original", "flexgen-paper"):
        data = paper_policy(a.model_key)
        if not data:
            return f"skipped: no policies/paper_{a.model_key}.json"
        pct = data["paper"]["percent"] if system == "original" else [data["policy"][k] for k in (
            "w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent")]
        _, c = sizes(cfg, 1, a.prompt_len + a.gen_len)
        need_disk = w * (100 - pct[0] - pct[1]) / 100
        need_host = w * pct[1] / 100
        if need_host > 0.75 * ram or need_disk > 0.8 * disk:
            return (f"skipped: the paper's policy needs {need_host / GIB:.0f} GiB host + {need_disk / GIB:.0f} GiB "
                    f"disk for weights; this machine has {ram / GIB:.0f} GiB RAM, {disk / GIB:.0f} GiB free disk")
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        ap = argparse.ArgumentParser()
        ap.add_argument("--system", required=True)
        ap.add_argument("--model", required=True)
        ap.add_argument("--prompt-len", type=int, required=True)
        ap.add_argument("--gen-len", type=int, required=True)
        ap.add_argument("--gpu-cap-gib", type=float, default=16.0)
        ap.add_argument("--slice-s", type=float, default=600)
        ap.add_argument("--scratch", required=True)
        ap.add_argument("--hardware")
        ap.add_argument("--batches", type=int, nargs="*", default=[8])
        ap.add_argument("--policy-json", default="{}")
        ap.add_argument("--gbs", type=int, default=1)
        ap.add_argument("--ngb", type=int, default=1)
        ap.add_argument("--note", default="")
        ap.add_argument("--out", required=True)
        c = ap.parse_args(argv[1:])
        fn = child_accelerate if c.system == "accelerate" else child_flexgen
        Path(c.out).write_text(json.dumps(fn(c), default=str))
        return 0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-30b", choices=MODELS)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all systems together")
    ap.add_argument("--gpu-cap-gib", type=float, default=16.0)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    ap.add_argument("--original", metavar="DIR", help="the --fetch-original directory (else the original is skipped)")
    ap.add_argument("--original-cut-gen", type=int, help="the original's --cut-gen-len (decode projected)")
    ap.add_argument("--accelerate-batches", type=int, nargs="+", help="default by model, largest first")
    ap.add_argument("--hardware", help="flexgen's hardware profile (default: measured quickly here)")
    ap.add_argument("--fetch-original", metavar="DIR", help="download the wheels into DIR, then exit")
    ap.add_argument("--self-test", action="store_true", help="no CUDA: every system's path on a tiny model")
    ap.add_argument("--out", default="gpu_compare.json")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--log-dir", help="each system's output, one file per system, kept (default: beside --out, "
                    "OUT_logs/)")
    a = ap.parse_args(argv)
    if a.fetch_original:
        return fetch_original(Path(a.fetch_original))
    import torch

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not a.self_test
    if not cuda and not a.self_test:
        print("gpu_compare: no CUDA device (use --self-test on a CPU)", file=sys.stderr)
        return 2
    a.model_key = a.model
    if a.self_test:
        a.model, a.prompt_len, a.gen_len, a.gpu_cap_gib = "tiny", 16, 4, 2.0
        a.hardware = a.hardware or "t4"
        a.model_key = "opt-30b"   # whose paper policy the tiny model runs (block shrunk below)
    systems = [s for s in a.systems.split(",") if s]
    logs = Path(a.log_dir) if a.log_dir else Path(a.out).with_name(Path(a.out).stem + "_logs")
    cfg = hf_config(a.model)
    ram = host_ram()
    scratch = Path(tempfile.mkdtemp(prefix="gpu-compare-"))
    st = os.statvfs(scratch)
    disk = st.f_bavail * st.f_frsize
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if a.original:
        try:
            import pulp  # noqa: F401
        except ImportError:   # the optimizer needs pulp: from the fetched wheel, on the children's path
            site = scratch / "pulp-site"
            whl = sorted(Path(a.original).glob("deps/pulp-*.whl"))
            if whl:
                subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                                str(site), str(whl[-1])], check=True)
                env["PYTHONPATH"] += os.pathsep + str(site)

    def left() -> float:
        return a.budget - (time.perf_counter() - t_start)

    rows = []
    print(f"gpu_compare: {a.model_key if not a.self_test else 'tiny (self-test)'}, prompt {a.prompt_len}, gen "
          f"{a.gen_len}, GPU cap {a.gpu_cap_gib:g} GiB, budget {a.budget:.0f} s, host RAM {ram / GIB:.0f} GiB, "
          f"free disk {disk / GIB:.0f} GiB", flush=True)
    for i, system in enumerate(systems):
        why = None if a.self_test else feasibility(system, a, cfg, ram, disk)
        weights = sum(SLICE_WEIGHT.get(s, 1.0) for s in systems[i:]
                      if a.self_test or not feasibility(s, a, cfg, ram, disk))
        slice_s = left() * SLICE_WEIGHT.get(system, 1.0) / max(weights, 1e-9)
        if why is None and slice_s < 30:
            why = f"skipped: {left():.0f} s left of the budget"
        if why:
            rows.append({"system": system, "skipped": why})
            print(f"SKIP {system}: {why}", flush=True)
            continue
        base = [sys.executable, str(Path(__file__).resolve()), "child", "--system", system, "--model", a.model,
                "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len), "--gpu-cap-gib", str(a.gpu_cap_gib),
                "--slice-s", str(slice_s), "--scratch", str(scratch / system)]
        data = paper_policy(a.model_key)
        if system == "flexgen":
            r = run_child(base + (["--hardware", a.hardware] if a.hardware else []), slice_s, system,
                          logs / f"{system}.log", env)
        elif system == "accelerate":
            bs = a.accelerate_batches or ([4, 2] if a.self_test else {"opt-6.7b": [32, 16, 8], "opt-30b": [16, 8, 4, 2],
                                                                      "opt-175b": [4, 2, 1]}[a.model_key])
            r = run_child(base + ["--batches", *map(str, bs)], slice_s, system, logs / f"{system}.log", env)
        elif system == "flexgen-paper":
            p = data["policy"]
            gbs, ngb, need = fit_block(cfg, p["gpu_batch_size"], p["num_gpu_batches"], p["w_cpu_percent"],
                                       p["cache_cpu_percent"], a.prompt_len, a.gen_len, ram)
            if a.self_test:
                gbs, ngb = 2, 2
            note = "paper's policy" + ("" if (gbs, ngb) == (p["gpu_batch_size"], p["num_gpu_batches"]) else
                                       f", block shrunk from {p['gpu_batch_size']}x{p['num_gpu_batches']} to "
                                       f"{gbs}x{ngb} (host RAM)")
            r = run_child(base + ["--policy-json", json.dumps(data), "--gbs", str(gbs), "--ngb", str(ngb),
                                  "--note", note], slice_s, system, logs / f"{system}.log", env)
        elif system == "original":
            if not a.original:
                r = {"system": system, "skipped": "no --original DIR (fetch it with --fetch-original DIR)"}
            else:
                try:
                    py = original_python(Path(a.original), print)
                except (RuntimeError, subprocess.CalledProcessError) as e:
                    r = {"system": system, "failed": f"install: {e}"}
                else:
                    pp = data["paper"]
                    gbs, ngb, _ = fit_block(cfg, pp["gpu_batch_size"], pp["num_gpu_batches"], pp["percent"][1],
                                            pp["percent"][3], a.prompt_len, a.gen_len, ram)
                    if a.self_test:
                        gbs, ngb = 2, 2
                    cenv = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # never this repo's flexgen
                    cmd = [py] + original_cmd(a, pp, gbs, ngb, scratch, check=not cuda)
                    r = _run_original(cmd, slice_s, cenv, scratch, logs / "original.log")
                    r["system"] = system
                    r.setdefault("batch", gbs * ngb)
                    r["policy_text"] = (f"{gbs}x{ngb}, " + " ".join(str(x) for x in pp["percent"])
                                        + "".join(f", {f}" for f in pp.get("flags", [])))
                    if (gbs, ngb) != (pp["gpu_batch_size"], pp["num_gpu_batches"]):
                        r["note"] = (f"paper's policy, block shrunk from {pp['gpu_batch_size']}x"
                                     f"{pp['num_gpu_batches']} to {gbs}x{ngb} (host RAM)")
                    else:
                        r["note"] = "paper's policy"
                    if a.original_cut_gen:
                        r["note"] += f"; decode projected from --cut-gen-len {a.original_cut_gen}"
                    if r.get("check") == "ok":
                        r["skipped"] = "no CUDA: venv, offline install, import, tokenizer and flags checked"
        else:
            r = {"system": system, "failed": "unknown system"}
        rows.append(r)
        brief = {k: v for k, v in r.items() if k not in ("log_tail", "args", "engine_peak")}
        print(f"{'FAIL' if 'failed' in r else 'SKIP' if 'skipped' in r else 'OK  '} {system}: "
              f"{json.dumps(brief, default=str)[:500]}", flush=True)
    import shutil
    shutil.rmtree(scratch, ignore_errors=True)   # run files, the original's offload directory
    return finish(a, rows, cuda, ram, disk, argv)


def _run_original(cmd: list, slice_s: float, env: dict, scratch: Path, log: Path) -> dict:
    """The original's wrapper, with cwd outside this repository (its log and offload files go there)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False, dir=scratch) as f:
        out_json = f.name
    t0 = time.perf_counter()
    rc, lines = run_logged(cmd[:2] + ["--json-out", out_json] + cmd[2:], slice_s, log, env=env, cwd=scratch)
    try:
        res = json.loads(Path(out_json).read_text())
        res.pop("args", None)
    except (OSError, json.JSONDecodeError):
        res = failure(rc, lines, slice_s)
    if "peak_gpu_reserved" in res:
        res["peak_gpu"] = res["peak_gpu_reserved"]
    res["wall_s_total"] = time.perf_counter() - t0
    return res


def _placement(r: dict) -> str:
    if "policy" in r:
        p = r["policy"]
        s = f"{p['gpu_batch_size']}x{p['num_gpu_batches']}, " + " ".join(
            f"{p[k]:g}" for k in ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                                  "act_gpu_percent", "act_cpu_percent"))
        flags = [f for f in ("cpu_cache_compute", "compress_weight", "compress_cache") if p.get(f)]
        return s + "".join(f", {f}" for f in flags)
    if "device_map" in r:
        return "layers " + ", ".join(f"{k}: {v}" for k, v in sorted(r["device_map"].items()))
    return r.get("policy_text", "-")


def finish(a, rows, cuda, ram, disk, argv) -> int:
    ref = next((r["throughput"] for r in rows if r["system"] == "flexgen" and r.get("throughput")), None)
    head = (f"gpu_compare: {a.model_key if not a.self_test else 'tiny (self-test)'}, dummy weights, "
            f"GPU memory capped at {a.gpu_cap_gib:g} GiB per system (set_per_process_memory_fraction)")
    lines = [head, "", "| system | policy / device map | batch | prompt | gen | prefill s | decode s | token/s | "
             "peak GPU GiB | vs flexgen | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "throughput" not in r:
            why = r.get("skipped") or r.get("failed")
            lines.append(f"| {r['system']} | {_placement(r)} | - | {a.prompt_len} | {a.gen_len} | - | - | - | - | - | "
                         f"{'skipped' if 'skipped' in r else 'failed'}: {why} |".replace("skipped: skipped:",
                                                                                            "skipped:"))
            continue
        peak = "-" if r.get("peak_gpu") is None else f"{r['peak_gpu'] / GIB:.2f}"
        ratio = f"{r['throughput'] / ref:.3f}" if ref else "-"
        note = r.get("note", "")
        if "tried" in r:
            note += ("; " if note else "") + "batches: " + ", ".join(f"{k}: {v}" for k, v in r["tried"].items())
        lines.append(f"| {r['system']} | {_placement(r)} | {r.get('batch', '-')} | {a.prompt_len} | {a.gen_len} | "
                     f"{r['prefill_s']:.2f} | {r['decode_s']:.2f} | {r['throughput']:.3f} | {peak} | {ratio} | "
                     f"{note} |")
    checks = []
    if a.model_key == "opt-30b" and not a.self_test:
        tp = {r["system"]: r.get("throughput") for r in rows}
        fg = max((r["throughput"] for r in rows if r["system"].startswith("flexgen") and r.get("throughput")),
                 default=None)
        for name, peer, factor in (("original", tp.get("original"), 1), ("accelerate", tp.get("accelerate"), 10)):
            if fg is None or not peer:
                checks.append(f"N/A  flexgen >= {factor}x {name}: a throughput is missing")
            else:
                ok = fg >= factor * peer
                checks.append(f"{'PASS' if ok else 'FAIL'} flexgen {fg:.3f} >= {factor}x {name} {peer:.3f} token/s "
                              f"({fg / peer:.2f}x)")
    table = "\n".join(lines + ([""] + checks if checks else []))
    print(table)
    sys.path.insert(0, str(HERE))
    from compare import machine
    mach = machine()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    Path(a.out).write_text(json.dumps({"model": a.model_key, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
                                       "gpu_cap_gib": a.gpu_cap_gib, "rows": rows, "checks": checks, "machine": mach,
                                       "host_ram_gib": round(ram / GIB, 1), "disk_free_gib": round(disk / GIB, 1),
                                       "date": when, "self_test": a.self_test}, indent=1, default=str))
    if a.record:
        cmd = "python benchmarks/gpu_compare.py " + " ".join(argv)
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(f"\n## gpu_compare.py: {a.model_key}\n\n- command: `{cmd}`\n- machine: {mach['cpu']}, "
                    f"{mach['cores']} cores, {mach['ram_gib']} GiB RAM, GPU {mach['gpu'] or 'none'}\n- date: {when}\n\n"
                    f"{table}\n")
    return 1 if any(c.startswith("FAIL") for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
