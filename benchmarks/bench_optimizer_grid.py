"""The optimizer's choice vs a grid of hand-picked policies, all run through the engine.

    python benchmarks/bench_optimizer_grid.py [--profile FILE] [--out benchmarks/optimizer_grid.md]

On this machine (CPU compute device, dummy weights), for one model, prompt / generation
length and memory budget that force offloading:

1. takes the machine's measured profile (`default_profile_path()`, or `--profile`; when
   neither exists it measures one with `measure_hardware`, calibrating the per-layer
   overhead on the engine, and saves it at the default path);
2. keeps the policies of GRID that the cost model says fit the budget (at least 8 are
   required) and asks `search_detailed` for its policy under the same budget;
3. runs every policy through the engine with the same torch thread count: a short
   warm-up, then `--repeats` timed `generate` calls per policy, in round-robin passes
   over all policies (the optimizer's included) so that drift in the machine's load
   hits them alike. Throughput is `GenerationStats.throughput` (generated tokens /
   (prefill + decode) seconds, the paper's figure and the cost model's), best of the
   passes; the engine's memory tracker gives the peak per tier, checked against the
   usable budget;
4. reports the ratio optimizer-measured / best-grid-measured (PASS at >= 0.90).

Budgets are given like `flexgen optimize --gpu-mem/--cpu-mem/--disk-mem` (GiB); the
cpu budget is memory for tensors (the profile's `cpu_reserved`, the process itself, comes
off the machine's total, not off the budget), and the usable figures are what the cost model and the measured peaks are held to.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexgen import Policy, load_model  # noqa: E402
from flexgen.device import DTYPES  # noqa: E402
from flexgen.models.opt import ModelArgs  # noqa: E402
from flexgen.calibrate import measure_hardware  # noqa: E402
from flexgen.optimizer import (GIB, Budgets, HardwareProfile, default_profile_path, estimate,  # noqa: E402
                               search_detailed)

TIERS = ("gpu", "cpu", "disk")

# (gpu_batch_size, num_gpu_batches, (wg wc cg cc hg hc), cpu_cache_compute): what one would try
# by hand. Blocks from 8 to 64 sequences; cache on the gpu tier, in host memory, half or all
# on disk; activations on gpu / cpu; cpu_cache_compute on and off. Sized for the default
# budget (opt-125m, gpu 0.3 / cpu 2.3 / disk 1 GiB); infeasible ones are dropped at run time.
GRID = [
    (8, 1, (30, 50, 100, 0, 100, 0), False),
    (8, 2, (40, 40, 0, 100, 100, 0), False),
    (8, 2, (40, 40, 0, 100, 0, 100), False),
    (8, 4, (40, 40, 0, 100, 100, 0), False),
    (16, 1, (30, 50, 0, 100, 100, 0), False),
    (16, 1, (30, 50, 0, 100, 100, 0), True),
    (16, 2, (30, 40, 0, 100, 100, 0), False),
    (16, 2, (30, 40, 0, 100, 100, 0), True),
    (24, 1, (30, 50, 0, 100, 100, 0), False),
    (24, 1, (30, 50, 0, 100, 100, 0), True),
    (32, 1, (20, 30, 0, 100, 100, 0), True),
    (16, 4, (30, 40, 0, 50, 100, 0), True),
    (32, 2, (20, 30, 0, 50, 100, 0), True),
    (48, 1, (0, 60, 0, 0, 100, 0), True),
]


def fmt_policy(p: Policy) -> str:
    pct = " ".join(f"{v:g}" for v in p.percent)
    flags = [f for f in ("cpu_cache_compute", "compress_weight", "compress_cache") if getattr(p, f)]
    if not p.overlap:
        flags.append("no overlap")
    return f"{p.gpu_batch_size}×{p.num_gpu_batches}, {pct}" + (f", {'+'.join(flags)}" if flags else "")


def mib(x: float) -> str:
    return f"{x / 2**20:.0f}"


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


class Run:
    """One policy: the cost model's estimate and the engine's passes."""

    def __init__(self, label: str, policy: Policy, est):
        self.label, self.policy, self.est = label, policy, est
        self.passes: list[dict] = []

    @property
    def measured(self) -> float:
        return max((p["throughput"] for p in self.passes), default=0.0)

    @property
    def peak(self) -> dict[str, int]:
        return {t: max((p["peak"].get(t, 0) for p in self.passes), default=0) for t in TIERS}

    def within(self, budgets: Budgets) -> bool:
        return all(self.peak[t] <= budgets.of(t) for t in TIERS)


def run_pass(run: Run, model: str, prompt_len: int, gen_len: int, dtype, offload_dir: Path, seed: int) -> dict:
    p = run.policy
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (p.block_size, prompt_len), generator=g)
    t_load = time.perf_counter()
    with load_model(model, p, device="cpu", dtype=dtype, offload_dir=offload_dir, dummy=True) as m:
        t_load = time.perf_counter() - t_load
        m.generate(ids[:, :8], max_new_tokens=2, eos_token_id=[])   # warm up
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=gen_len, eos_token_id=[])
        wall = time.perf_counter() - t0
        st = m.stats
        out = dict(throughput=st.throughput, wall=wall, prefill=st.prefill_time, decode=st.decode_time,
                   tokens=st.generated_tokens, peak=dict(st.peak_memory), load=t_load)
    run.passes.append(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-125m")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=0.3, help="GiB (the 'gpu' tier: a budget of host memory here)")
    ap.add_argument("--cpu-mem", type=float, default=2.3, help="GiB, for tensors (the profile.s cpu_reserved comes off the machine total, not this)")
    ap.add_argument("--disk-mem", type=float, default=1.0, help="GiB")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for everything (default 1)")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes over all policies (best is kept)")
    ap.add_argument("--profile", help="a hardware profile JSON (default: default_profile_path(), else measure)")
    ap.add_argument("--no-engine-overhead", action="store_true",
                    help="when measuring, keep the kernel-level per-layer overhead (no engine calibration)")
    ap.add_argument("--gpu-batch-size", type=int, help="cap the optimizer's block: fix its gpu batch size")
    ap.add_argument("--num-gpu-batches", type=int, help="cap the optimizer's block: fix its number of gpu batches")
    ap.add_argument("--time-limit", type=float, default=330.0,
                    help="seconds; skip further passes once another one would likely overrun")
    ap.add_argument("--dry-run", action="store_true", help="cost model and search only, no engine runs")
    ap.add_argument("--offload-dir", help="where the engine's offload files go (default: a temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "optimizer_grid.md"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log = lambda s: print(f"[{time.perf_counter() - t_start:6.1f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731

    tmp = tempfile.TemporaryDirectory(prefix="flexgen-grid-", dir=args.offload_dir)
    base = Path(tmp.name)
    try:
        # -- the profile ------------------------------------------------------------------
        if args.profile:
            hw = HardwareProfile.load(args.profile)
            profile_src = f"loaded from `{args.profile}`"
        elif default_profile_path().is_file():
            hw = HardwareProfile.load(default_profile_path())
            profile_src = f"loaded from `{default_profile_path()}`"
        else:
            log("no profile at the default path: measuring this machine ...")
            hw = measure_hardware(base / "probe", device="cpu", engine=not args.no_engine_overhead, log=log)
            hw.save(default_profile_path())
            profile_src = (f"measured by this run ({args.threads} thread(s)"
                           f"{'' if args.no_engine_overhead else ', overhead calibrated on the engine'}) "
                           f"and saved to `{default_profile_path()}`")
        if hw.compute_device != "cpu":
            raise SystemExit(f"profile {hw.name!r} is for {hw.compute_device}; this benchmark runs on the CPU")
        dtype = DTYPES[hw.compute_dtype]
        log(f"profile {hw.name}: {hw.compute_dtype}, matmul {hw.gpu_matmul_flops / 1e9:.0f} GFLOP/s, "
            f"layer overhead {hw.layer_overhead * 1e6:.0f} us")

        margs = ModelArgs.from_name(args.model)
        s, n = args.prompt_len, args.gen_len
        gib = lambda x: x * GIB  # noqa: E731
        budgets = Budgets.from_request(hw, gib(args.gpu_mem), gib(args.cpu_mem), gib(args.disk_mem))

        # -- the grid and the optimizer's choice ------------------------------------------------
        grid, dropped = [], []
        for gbs, ngb, pct, ccc in GRID:
            p = Policy.from_percent(pct, gpu_batch_size=gbs, num_gpu_batches=ngb, cpu_cache_compute=ccc)
            est = estimate(margs, p, s, n, hw, budgets=budgets)
            if est.feasible:
                grid.append(Run(f"G{len(grid) + 1}", p, est))
            else:
                dropped.append((p, est.shortfalls))
        for p, why in dropped:
            log(f"grid: dropped {fmt_policy(p)}: {'; '.join(why)}")
        if len(grid) < 8:
            raise SystemExit(f"only {len(grid)} grid policies fit the budget; the goal needs at least 8")
        t0 = time.perf_counter()
        res = search_detailed(margs, s, n, hw, gib(args.gpu_mem), gib(args.cpu_mem), gib(args.disk_mem),
                              gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches)
        search_s = time.perf_counter() - t0
        opt = Run("OPT", res.policy, res.estimate)
        log(f"search: {fmt_policy(res.policy)}, predicted {res.estimate.throughput:.1f} token/s "
            f"({res.lp_solves} LPs, {search_s:.1f} s)")
        same = [r.label for r in grid if r.policy == res.policy]
        runs = grid + [opt]
        for r in runs:
            log(f"{r.label}: {fmt_policy(r.policy)}: predicted {r.est.throughput:.1f} token/s, "
                f"{r.est.total_time:.2f} s")

        # -- the engine ---------------------------------------------------------------------------
        passes_done = 0
        skipped_note = ""
        pass_start = time.perf_counter()
        if not args.dry_run:
            for k in range(args.repeats):
                if k > 0:
                    last = time.perf_counter() - pass_start
                    left = args.time_limit - (time.perf_counter() - t_start)
                    if last > left:
                        skipped_note = (f"Pass {k + 1} of {args.repeats} skipped: the last pass took {last:.0f} s "
                                        f"and {left:.0f} s of the {args.time_limit:.0f} s limit were left.")
                        log(skipped_note)
                        break
                pass_start = time.perf_counter()
                # Alternate the order between passes so that no policy always runs first or last.
                order = runs if k % 2 == 0 else runs[::-1]
                for r in order:
                    out = run_pass(r, args.model, s, n, dtype, base / "off", seed=k)
                    log(f"pass {k + 1} {r.label} {fmt_policy(r.policy)}: {out['throughput']:.1f} token/s "
                        f"(predicted {r.est.throughput:.1f}), wall {out['wall']:.2f} s, load {out['load']:.1f} s, "
                        f"peak MiB " + "/".join(mib(out['peak'].get(t, 0)) for t in TIERS))
                passes_done += 1
    finally:
        tmp.cleanup()

    # -- the report -------------------------------------------------------------------------------
    best = max(grid, key=lambda r: r.measured)
    best_pred = max(grid, key=lambda r: r.est.throughput)
    ratio = opt.measured / best.measured if best.measured else float("nan")
    verdict = "PASS" if ratio >= 0.90 else "FAIL"
    rho = spearman([r.est.throughput for r in runs], [r.measured for r in runs]) if passes_done else float("nan")
    given_args = list(sys.argv[1:] if argv is None else argv)
    cmd = " ".join(["python benchmarks/bench_optimizer_grid.py"] + ([shlex.join(given_args)] if given_args else []))
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    usable = " / ".join(f"{t} {budgets.of(t) / GIB:.2f}" for t in TIERS)
    given = " / ".join(f"{t} {g:g}" for t, g in zip(TIERS, (args.gpu_mem, args.cpu_mem, args.disk_mem)))
    w_mib = estimate(margs, Policy(), s, n, hw).memory_breakdown["prefill"]["gpu"]["weights"] / 2**20
    cap = ("none (the budgets bound the block)" if args.gpu_batch_size is None and args.num_gpu_batches is None
           else f"gpu_batch_size={args.gpu_batch_size}, num_gpu_batches={args.num_gpu_batches}")

    def row(r: Run) -> str:
        pk = r.peak
        mem = " | ".join(f"{mib(pk[t])} / {mib(r.est.memory[t])} / {mib(budgets.of(t))}" for t in TIERS)
        ok = "yes" if r.within(budgets) else "**no**"
        meas = f"{r.measured:.1f}" if r.passes else "–"
        each = ", ".join(f"{p['throughput']:.1f}" for p in r.passes) or "–"
        rel = f"{r.measured / r.est.throughput:.2f}" if r.passes else "–"
        name = f"**{r.label}**" if (r is best and r.passes) or r is opt else r.label
        return (f"| {name} | {fmt_policy(r.policy)} | {r.est.throughput:.1f} | {meas} | {each} | {rel} "
                f"| {mem} | {ok} |")

    head = ("| # | Policy (gbs×ngb, wg wc cg cc hg hc) | predicted token/s | measured token/s (best) "
            "| each pass | measured / predicted | gpu MiB peak / model / budget | cpu MiB peak / model / budget "
            "| disk MiB peak / model / budget | peak within budget |")
    sep = "|---|---|---|---|---|---|---|---|---|---|"
    lines = [
        "# The optimizer's choice vs a grid of policies, measured on this machine (CPU)",
        "",
        f"Generated by `{cmd}` on {now}.",
        "",
        f"- Machine: {hw.device}; {platform.platform()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}; **{torch.get_num_threads()} torch thread(s)** for the profile's kernels and "
        "every run (one thread was the steadier setting on this shared VM, see optimizer_cpu.md).",
        f"- Profile {profile_src}: {hw.compute_dtype}, measured {hw.date}; matmul "
        f"{hw.gpu_matmul_flops / 1e9:.0f} GFLOP/s, memory {hw.gpu_mem_bw / 1e9:.1f} GB/s, copies "
        f"{hw.cpu_to_gpu_bw / 1e9:.1f} GB/s, disk read {hw.disk_read_bw / 1e9:.2f} / write "
        f"{hw.disk_write_bw / 1e9:.2f} GB/s, attention prefill {hw.gpu_attn_flops_prefill / 1e9:.0f} / decode "
        f"{hw.gpu_attn_flops_decode / 1e9:.1f} GFLOP/s, layer overhead {hw.layer_overhead * 1e6:.0f} us, "
        f"cpu_reserved {hw.cpu_reserved / GIB:.1f} GiB.",
        f"- Workload: dummy {args.model} ({w_mib:.0f} MiB of {hw.compute_dtype} weights), prompt {s}, generate {n}, "
        "every policy runs one full block (gbs × ngb sequences).",
        f"- Budget (GiB) given: {given}; usable after the profile's reserves: **{usable}**. The \"gpu\" tier is "
        "a budgeted part of host memory here. Grid policies were kept only when the cost model says they fit "
        f"(`estimate(..., budgets=...)`); {len(dropped)} of {len(GRID)} candidates were dropped as infeasible.",
        f"- Optimizer: `search_detailed` with the same budgets, block cap {cap}; {res.lp_solves} LPs, "
        f"{search_s:.1f} s." + (f" Its policy is also grid policy {', '.join(same)}." if same else ""),
        f"- Measurement: per policy a fresh `load_model(..., device=\"cpu\", dummy=True)`, a warm-up "
        f"`generate` (8 tokens + 2), then one timed `generate`; throughput is `GenerationStats.throughput` "
        f"(generated tokens / (prefill + decode) s). {passes_done} round-robin pass(es) over all "
        f"{len(runs)} policies (order reversed on odd passes), best pass kept. Memory: the engine tracker's peak "
        "per tier over the passes (weights, slots, staging, KV cache, hidden rows: not compute temporaries) vs the "
        "cost model's full peak and the usable budget." + (f" {skipped_note}" if skipped_note else ""),
        "",
        head,
        sep,
    ]
    lines += [row(r) for r in grid]
    lines += ["", "The optimizer's policy, run the same way:", "", head, sep, row(opt), ""]
    if passes_done:
        lines += [
            f"**Optimizer measured / best grid measured = {opt.measured:.1f} / {best.measured:.1f} "
            f"({best.label}) = {ratio:.3f} → {verdict}** (threshold 0.90).",
            "",
            f"- Best grid policy by the cost model: {best_pred.label} ({fmt_policy(best_pred.policy)}, "
            f"predicted {best_pred.est.throughput:.1f}, measured {best_pred.measured:.1f}); "
            f"by measurement: {best.label} ({fmt_policy(best.policy)}, predicted {best.est.throughput:.1f}).",
            f"- Rank correlation (Spearman) of predicted vs measured throughput over all {len(runs)} policies: "
            f"{rho:.2f}. Measured / predicted ranges {min(r.measured / r.est.throughput for r in runs):.2f}"
            f"–{max(r.measured / r.est.throughput for r in runs):.2f}.",
            f"- Measured peaks within the usable budget: "
            f"{sum(r.within(budgets) for r in runs)} of {len(runs)} policies.",
            "",
        ]
    else:
        lines += ["Dry run: no engine measurements.", ""]
    text = "\n".join(lines)
    if not args.dry_run:
        Path(args.out).write_text(text)
    print(text)
    return 0 if (args.dry_run or verdict == "PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
