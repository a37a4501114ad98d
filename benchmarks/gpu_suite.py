"""One-call GPU check: `python benchmarks/gpu_suite.py --out gpu_suite.json`.

Fits one 10-minute call on a GPU machine (`--budget` seconds, default 540: later, optional
checks are skipped when time runs short). Prints OK / FAIL / SKIP per check and writes a
JSON file with every figure. Checks, in order:

  env               torch, CUDA device, host RAM, which optional modules are present
  sdpa_kernel       which fused attention kernels accept the decode shapes, with and
                    without a boolean mask (a mask rules out flash attention)
  dequant_speed     4-bit weight dequantization on the device, GB/s written
  pinned_bandwidth  host->device GB/s from page-locked (cudaHostRegister, as the engine
                    pins), torch's pinned allocator, and pageable memory
  tokens            a tiny random OPT against transformers: fp32 must match token for token
                    under every tier policy; fp16 is compared to the same policy run with a
                    lagging GPU (torch.cuda._sleep before each layer), which changes tokens
                    if any stream hand-off races
  sync_count        synchronising calls per token step (torch.cuda.set_sync_debug_mode)
  weight_streaming  a 2-layer OPT-30B-width model with weights in host memory: GB/s
                    streamed vs pinned bandwidth, overlap on vs off, the engine's memory
                    tracker vs torch's allocated / reserved
  plan_pinned       the `--gpu-mem 16` OPT-30B plan's page-locked bytes vs host RAM
  paper_rows        the paper's OPT-6.7B / 30B / 175B rows (dummy weights) under a 16 GB
                    cap, as host RAM, disk and time allow

Without CUDA (`--self-test`, run by tests/test_gpu_suite.py) the checks that need a GPU
are SKIPped and the rest run small, so the script does not rot.

Needs: torch (any recent CUDA build), numpy, safetensors, tqdm (the engine), and for
`tokens` transformers, for `plan_pinned` pulp. A GPU machine without network may lack
pulp: build a wheel here (`pip download pulp -d wheels`), carry `wheels/` with the call
and `pip install --no-index wheels/*.whl` first; flexgen itself needs no install when
run from the repository root (`PYTHONPATH=.`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1 << 30


class Suite:
    def __init__(self, budget: float, cuda: bool, quick: bool, out: Path):
        self.t0, self.budget, self.cuda, self.quick, self.out = time.perf_counter(), budget, cuda, quick, out
        self.results: dict[str, dict] = {}
        self.figures: dict[str, float] = {}   # shared between checks, not reported

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def run(self, name: str, fn, needs_cuda: bool = False, min_left: float = 0.0):
        if needs_cuda and not self.cuda:
            self._done(name, "SKIP", {"why": "no CUDA device"})
            return
        if self.left() < min_left:
            self._done(name, "SKIP", {"why": f"{self.left():.0f} s left of the budget"})
            return
        t = time.perf_counter()
        try:
            ok, info = fn()
            status = "OK" if ok is True else ("SKIP" if ok is None else "FAIL")
        except Exception as e:   # one broken check must not hide the others
            import traceback
            status, info = "FAIL", {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        info["seconds"] = round(time.perf_counter() - t, 2)
        self._done(name, status, info)

    def _done(self, name, status, info):
        self.results[name] = {"status": status, **info}
        brief = {k: v for k, v in info.items() if k not in ("trace",)}
        print(f"{status:4s} {name}: {json.dumps(brief, default=str)[:600]}", flush=True)
        # Written after every check: a call killed at its time limit still leaves results.
        self.out.write_text(json.dumps(self.results, indent=1, default=str))


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _time(fn, dev, repeat=3):
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t)
    return best


def _host_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


# -- checks ---------------------------------------------------------------------------

def check_env(s: Suite):
    mods = {}
    for m in ("numpy", "safetensors", "tqdm", "transformers", "pulp"):
        try:
            mod = __import__(m)
            mods[m] = getattr(mod, "__version__", "present")
        except ImportError:
            mods[m] = None
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host_ram_gib": round(_host_ram() / GIB, 1), "modules": mods}
    if s.cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, device_mem_gib=round(p.total_memory / GIB, 1))
    missing = [m for m in ("numpy", "safetensors", "tqdm") if mods[m] is None]
    if missing:
        info["needs"] = f"pip install {' '.join(missing)} (or carry wheels, see the docstring)"
    return not missing, info


def check_sdpa(s: Suite):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = _device()
    dt = torch.float16 if s.cuda else torch.float32
    r, nh, d, t = 8, 32, 128, 512
    q = torch.randn(r, nh, 1, d, device=dev, dtype=dt)
    k = torch.randn(r, nh, t, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    mask = torch.ones(r, 1, 1, t, dtype=torch.bool, device=dev)
    out = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("math", SDPBackend.MATH)):
        for label, m in (("no_mask", None), ("bool_mask", mask)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with sdpa_kernel([be]):
                        F.scaled_dot_product_attention(q, k, v, attn_mask=m)
                out[f"{name}/{label}"] = True
            except RuntimeError:
                out[f"{name}/{label}"] = False
    ok = out["flash/no_mask"] or out["efficient/no_mask"] if s.cuda else True
    return ok, {"accepts": out}


def check_dequant(s: Suite):
    from flexgen.quant import WEIGHT_QUANT, dequantize, quantize
    dev = _device()
    shape = (1024, 4096) if s.quick else (4096, 16384)
    dt = torch.float16 if s.cuda else torch.float32
    w = torch.randn(shape, device=dev, dtype=dt)
    p = quantize(w, WEIGHT_QUANT)
    out = torch.empty(shape, device=dev, dtype=dt)
    sec = _time(lambda: dequantize(p, dt, out=out), dev)
    err = (out.float() - w.float()).abs().max().item()
    return err < 0.5, {"shape": shape, "gb_per_s": round(out.numel() * out.element_size() / sec / 1e9, 2),
                       "max_abs_err": round(err, 4)}


def check_pinned(s: Suite):
    from flexgen.device import ComputeDevice
    cd = ComputeDevice("cuda")
    n = 256 << 20
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    reg = cd.host_bytes(n, pin=True)
    alloc = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    page = torch.empty(n, dtype=torch.uint8)
    bw = {}
    for name, h in (("registered", reg), ("pin_memory", alloc), ("pageable", page)):
        bw[name] = round(n / _time(lambda: dev.copy_(h, non_blocking=True), dev.device) / 1e9, 2)
        bw[name + "_d2h"] = round(n / _time(lambda: h.copy_(dev, non_blocking=True), dev.device) / 1e9, 2)
    s.figures["pinned_h2d_gbps"] = bw["registered"]
    return bw["registered"] >= 0.8 * bw["pin_memory"], {"gb_per_s": bw, "registered_is_pinned": reg.is_pinned()}


def _tiny_opt(directory: Path):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, ffn_dim=256, vocab_size=512,
                    max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model


def _policies():
    from flexgen import Policy

    def P(wg=100, wc=0, cg=100, cc=0, hg=100, hc=0, **kw):
        kw.setdefault("gpu_batch_size", 2)
        return Policy(w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc,
                      act_gpu_percent=hg, act_cpu_percent=hc, **kw)
    return {
        "all-gpu": P(),
        "weights-cpu": P(0, 100),
        "weights-disk": P(0, 0),
        "cache-cpu": P(cg=0, cc=100),
        "cache-disk": P(cg=0, cc=0),
        "act-cpu-disk": P(hg=0, hc=50),
        "mixed-ngb2": P(30, 30, 30, 30, 30, 30, num_gpu_batches=2),
        "cpu-cache-compute": P(50, 50, 25, 50, 100, 0, gpu_batch_size=4, cpu_cache_compute=True,
                               num_gpu_batches=2),
        "cpu-cache-compute-disk": P(0, 0, 0, 50, cpu_cache_compute=True, num_gpu_batches=2),
        "compressed-mixed": P(30, 30, 30, 30, 30, 30, compress_weight=True, compress_cache=True, num_gpu_batches=2),
        "no-overlap-disk": P(0, 0, 0, 0, 0, 0, overlap=False, num_gpu_batches=2),
    }


def _lagging(cycles: int):
    """Patch the scheduler so the GPU lags the host before every layer (a race shows up)."""
    from flexgen import scheduler
    real = scheduler.Scheduler._compute

    def compute(self, *a, **kw):
        torch.cuda._sleep(cycles)
        return real(self, *a, **kw)
    scheduler.Scheduler._compute = compute
    return lambda: setattr(scheduler.Scheduler, "_compute", real)


def check_tokens(s: Suite):
    import flexgen
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    ref_model = _tiny_opt(work / "opt")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (6, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 1, 5, 0, 2]):
        ids[row, :pad], mask[row, :pad] = 1, 0
    gen = 6
    dev = "cuda" if s.cuda else "cpu"
    ref = ref_model.generate(ids, attention_mask=mask, max_new_tokens=gen, do_sample=False, eos_token_id=None,
                             pad_token_id=1)
    ref16 = None
    if s.cuda:
        m16 = ref_model.to("cuda", torch.float16)
        ref16 = m16.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=gen, do_sample=False,
                             eos_token_id=None, pad_token_id=1).cpu()
    policies = _policies()
    if s.quick:
        policies = {k: policies[k] for k in ("all-gpu", "weights-disk", "cpu-cache-compute", "compressed-mixed")}
    rows, ok = {}, True
    for name, pol in policies.items():
        if s.left() < 60:
            rows[name] = "skipped: time"
            continue
        r = {}
        dtypes = (torch.float32, torch.float16) if s.cuda else (torch.float32,)
        for dt in dtypes:
            outs = {}
            for lag in ((False, True) if s.cuda else (False,)):
                undo = _lagging(2_000_000) if lag else None
                try:
                    with flexgen.load_model(str(work / "opt"), pol, device=dev, dtype=dt,
                                            offload_dir=work / "off") as m:
                        outs[lag] = m.generate(ids, mask, max_new_tokens=gen, eos_token_id=[])
                finally:
                    if undo:
                        undo()
            key = "fp32" if dt == torch.float32 else "fp16"
            lossy = pol.compress_weight or pol.compress_cache
            if dt == torch.float32 and not lossy:
                r[key] = bool(torch.equal(outs[False], ref))
                ok &= r[key]
            else:
                base = ref if dt == torch.float32 else ref16
                r[key + "_agree_with_hf"] = round(float((outs[False] == base).float().mean()), 3)
            if True in outs:
                same = bool(torch.equal(outs[False], outs[True]))
                r[key + "_lag_same"] = same
                ok &= same
        rows[name] = r
    return ok, {"policies": rows}


def check_sync_count(s: Suite):
    import flexgen
    from flexgen import Policy
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    gen = 8
    counts = {}
    for name, pol in (("all-gpu", Policy(gpu_batch_size=8)),
                      ("weights-cpu", Policy(gpu_batch_size=8, w_gpu_percent=0, w_cpu_percent=100))):
        with flexgen.load_model("opt-125m", pol, device="cuda", dummy=True, offload_dir=work) as m:
            ids = torch.randint(4, 1000, (8, 32))
            m.generate(ids, max_new_tokens=2, eos_token_id=[])
            torch.cuda.set_sync_debug_mode(1)
            try:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    m.generate(ids, max_new_tokens=gen, eos_token_id=[])
            finally:
                torch.cuda.set_sync_debug_mode(0)
            counts[name] = round(len(w) / gen, 2)
    # Sampling, the stop check and the step's timing sync are a few per step; per layer would be ~37.
    return all(c <= 8 for c in counts.values()), {"syncs_per_token": counts}


def _write_config(directory: Path, args) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(args.to_hf_config()))
    return directory


def check_weight_streaming(s: Suite):
    import dataclasses

    import flexgen
    from flexgen import Policy
    from flexgen.models.opt import ModelArgs
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    base = ModelArgs.from_name("opt-30b")
    args = dataclasses.replace(base, name="stream-test", num_hidden_layers=2)
    if s.quick:   # the self-test: the same code path, a model of a few MB
        args = dataclasses.replace(args, hidden_size=256, ffn_dim=1024, num_attention_heads=4, vocab_size=1000)
    d = _write_config(work / "model", args)
    dev, dt = ("cuda", torch.float16) if s.cuda else ("cpu", torch.float32)
    gen, b = 8, 4
    ids = torch.randint(4, 1000, (b, 32))
    out = {}
    for overlap in (True, False):
        pol = Policy(gpu_batch_size=b, w_gpu_percent=0, w_cpu_percent=100, overlap=overlap)
        with flexgen.load_model(str(d), pol, device=dev, dtype=dt, dummy=True, offload_dir=work / "off") as m:
            m.generate(ids, max_new_tokens=2, eos_token_id=[])
            m.generate(ids, max_new_tokens=gen, eos_token_id=[])
            st = m.stats
            per_step = sum(lay.file_bytes for lay in m.weights.layouts)
            gbps = per_step * (gen - 1) / st.decode_time / 1e9 if st.decode_time else 0.0
            r = {"decode_s": round(st.decode_time, 3), "weights_gb_per_s": round(gbps, 2),
                 "tracker_gpu_peak_gib": round(st.peak_memory.get("gpu", 0) / GIB, 3)}
            host = sum(t.numel() for t in m.weights.cpu_parts if t is not None)
            r["host_weights_gib"] = round(host / GIB, 3)
            if s.cuda:
                r["cuda_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
                r["cuda_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
                r["pinned_gib"] = round(m.device.pinned_bytes / GIB, 3)   # still locked, after the run
                r["host_weights_pinned"] = m.device.pinned_bytes >= host
            out["overlap" if overlap else "sequential"] = r
    pinned = s.figures.get("pinned_h2d_gbps")
    if pinned:
        out["share_of_pinned_bw"] = round(out["overlap"]["weights_gb_per_s"] / pinned, 2)
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    out["allocator_settings"] = get() if get else None   # expandable_segments, unless the user set it
    if not s.cuda:
        return True, out
    # Host weights stay page-locked for the model's life, overlap does not slow decode, and
    # streaming reaches at least half the page-locked copy rate.
    ok = (all(out[k]["host_weights_pinned"] for k in ("overlap", "sequential"))
          and out["overlap"]["decode_s"] <= out["sequential"]["decode_s"] * 1.1
          and out.get("share_of_pinned_bw", 1.0) >= 0.5)
    return ok, out


def check_plan_pinned(s: Suite):
    from flexgen.models.opt import ModelArgs
    from flexgen.optimizer import GIB as OG, estimate, load_hardware
    from flexgen.policy import Policy
    ram = _host_ram() if s.cuda else 128 * GIB   # the self-test plans for the 128 GiB host
    args = ModelArgs.from_name("opt-30b")
    hw = load_hardware("t4")
    info = {"host_ram_gib": round(ram / GIB, 1)}
    try:
        import pulp  # noqa: F401
        from flexgen.optimizer import search
        policy, est = search(args, 512, 32, hw, gpu_mem=16 * OG, cpu_mem=ram or 128 * OG)
        info["source"] = "search --gpu-mem 16"
    except ImportError:
        data = json.loads((Path(__file__).resolve().parents[1] / "policies" / "paper_opt-30b.json").read_text())
        policy = Policy(**data["policy"])
        est = estimate(args, policy, 512, 32, hw)
        info["source"] = "policies/paper_opt-30b.json (pulp missing: pip install pulp for the search)"
    info.update(policy=policy.to_dict(), pinned_gib=round(est.pinned_bytes / GIB, 1),
                host_predicted_gib=round(est.memory["cpu"] / GIB, 1))
    # Page-locked memory beyond ~80% of RAM leaves the host nothing to run on.
    ok = not ram or est.pinned_bytes * 1.05 <= 0.8 * ram
    return ok, info


def check_paper_rows(s: Suite):
    import flexgen
    from flexgen.policy import Policy
    root = Path(__file__).resolve().parents[1] / "policies"
    out, ram = {}, _host_ram()
    disk_free = os.statvfs(tempfile.gettempdir())
    disk_free = disk_free.f_bavail * disk_free.f_frsize
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 16 * GIB / total))
    try:
        # Seconds each row needs (dummy weights are generated on the host, then placed).
        for name, params, need_s in (("opt-6.7b", 6.7e9, 150), ("opt-30b", 30e9, 420), ("opt-175b", 175e9, 900)):
            data = json.loads((root / f"paper_{name}.json").read_text())
            pol = Policy(**data["policy"])
            need_host = params * 2 * pol.w_cpu_percent / 100
            need_disk = params * 2 * (100 - pol.w_gpu_percent - pol.w_cpu_percent) / 100
            if need_host > 0.7 * ram or need_disk > 0.8 * disk_free or s.left() < need_s:
                out[name] = "skipped: host RAM, disk or time"
                continue
            ids = torch.randint(4, 1000, (pol.block_size, 512))
            with flexgen.load_model(name, pol, device="cuda", dtype=torch.float16, dummy=True,
                                    offload_dir=Path(tempfile.gettempdir()) / "gpu-suite-paper") as m:
                m.generate(ids, max_new_tokens=4, eos_token_id=[])
                out[name] = {"throughput": round(m.stats.throughput, 3), "paper": data["paper"]["throughput"],
                             "cuda_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return True, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_suite.json")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole suite")
    ap.add_argument("--self-test", action="store_true", help="without CUDA: the CPU parts, small")
    ap.add_argument("--checks", help="comma-separated subset to run, in the suite's order (default: all); "
                    "weight_streaming compares with pinned_bandwidth's figure when both run")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.self_test
    s = Suite(a.budget, cuda, quick=a.self_test, out=Path(a.out))
    checks = [("env", check_env, False, 0), ("sdpa_kernel", check_sdpa, False, 0),
              ("dequant_speed", check_dequant, False, 0), ("pinned_bandwidth", check_pinned, True, 0),
              ("tokens", check_tokens, False, 60), ("sync_count", check_sync_count, True, 30),
              ("weight_streaming", check_weight_streaming, False, 60), ("plan_pinned", check_plan_pinned, False, 0),
              ("paper_rows", check_paper_rows, True, 180)]
    chosen = a.checks.split(",") if a.checks else [c[0] for c in checks]
    unknown = set(chosen) - {c[0] for c in checks}
    if unknown:
        ap.error(f"unknown check(s): {', '.join(sorted(unknown))}; the checks: {', '.join(c[0] for c in checks)}")
    for name, fn, needs_cuda, min_left in checks:
        if name in chosen:
            s.run(name, lambda fn=fn: fn(s), needs_cuda=needs_cuda, min_left=min_left)
    failed = [k for k, v in s.results.items() if v["status"] == "FAIL"]
    print(f"{'FAIL' if failed else 'OK'}: {len(s.results) - len(failed)} of {len(s.results)} checks passed or skipped"
          f"{'; failed: ' + ', '.join(failed) if failed else ''}; results in {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
