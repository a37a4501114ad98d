"""Human-readable tables of an Estimate."""

from __future__ import annotations

from flexgen.optimizer.cost_model import GIB, LINKS, PHASES, TIER_NAMES, Estimate

_ARROW = {"disk->cpu": "disk→cpu", "cpu->gpu": "cpu→gpu", "gpu->cpu": "gpu→cpu", "cpu->disk": "cpu→disk"}


def _pct(x: float) -> str:
    return f"{x:g}"


def _seconds(t: float) -> str:
    if t >= 3600:
        return f"{t / 3600:.2f} h"
    if t >= 100:
        return f"{t:.0f} s"
    if t >= 1:
        return f"{t:.2f} s"
    return f"{t * 1000:.1f} ms"


def _throughput(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.1f}"


def describe_policy(p) -> list[str]:
    flags = [n for n in ("overlap", "cpu_cache_compute", "compress_weight", "compress_cache", "pin_weight")
             if getattr(p, n)]
    return [
        f"block        {p.gpu_batch_size} x {p.num_gpu_batches} gpu batches = {p.block_size} sequences",
        f"--percent    {' '.join(_pct(v) for v in p.percent)}   (wg wc cg cc hg hc)",
        f"  weights    gpu {_pct(p.w_gpu_percent)}%  cpu {_pct(p.w_cpu_percent)}%  disk {_pct(p.w_disk_percent)}%",
        f"  kv cache   gpu {_pct(p.cache_gpu_percent)}%  cpu {_pct(p.cache_cpu_percent)}%  "
        f"disk {_pct(p.cache_disk_percent)}%",
        f"  hidden     gpu {_pct(p.act_gpu_percent)}%  cpu {_pct(p.act_cpu_percent)}%  disk {_pct(p.act_disk_percent)}%",
        f"flags        {', '.join(flags) or 'none'}",
    ]


def format_estimate(est: Estimate, title: str | None = None) -> str:
    """A table: the policy, predicted throughput, memory per tier, I/O and the bottleneck."""
    lines = []
    lines.append(title or f"{est.model}: prompt {est.prompt_len}, generate {est.gen_len}, hardware {est.hardware}")
    lines += describe_policy(est.policy)
    tokens = est.policy.block_size * est.gen_len
    lines.append(f"throughput   {_throughput(est.throughput)} token/s  ({tokens} tokens in "
                 f"{_seconds(est.total_time)}: prefill {_seconds(est.prefill_time)} + decode "
                 f"{_seconds(est.decode_time)})")
    bn = []
    for phase in PHASES:
        if phase in est.bottleneck and est.bottleneck[phase] != "none":
            b = est.bottleneck[phase]
            share = est.bottleneck_share[phase].get(b, 0.0)
            bn.append(f"{phase}: {_ARROW.get(b, b)} ({share:.0%} of the time)")
    lines.append(f"bottleneck   {';  '.join(bn)}")
    lines.append("")
    lines.append(f"{'memory (GiB)':<14}" + "".join(f"{t:>10}" for t in TIER_NAMES))
    for phase, mem in est.memory_by_phase.items():
        lines.append(f"  {phase:<12}" + "".join(f"{mem[t] / GIB:>10.2f}" for t in TIER_NAMES))
    lines.append(f"  {'peak':<12}" + "".join(f"{est.memory[t] / GIB:>10.2f}" for t in TIER_NAMES))
    if est.budgets:
        lines.append(f"  {'usable':<12}" + "".join(f"{est.budgets[t] / GIB:>10.2f}" for t in TIER_NAMES))
    lines.append("")
    lines.append(f"{'per phase':<14}" + "".join(f"{_ARROW[k]:>11}" for k in LINKS) + f"{'compute':>11}"
                 + f"{'host attn':>11}")
    for phase in PHASES:
        if phase not in est.io_bytes or (phase == "decode" and est.gen_len == 1):
            continue
        io = est.io_bytes[phase]
        busy = est.busy_time[phase]
        lines.append(f"  {phase + ' GB':<12}" + "".join(f"{io[k] / 1e9:>11.1f}" for k in LINKS))
        lines.append(f"  {phase + ' s':<12}" + "".join(f"{busy[k]:>11.1f}" for k in LINKS)
                     + f"{busy['compute (gpu)']:>11.1f}{busy['compute (host)']:>11.1f}")
    if est.shortfalls:
        lines.append("")
        lines += [f"DOES NOT FIT: {s}" for s in est.shortfalls]
    return "\n".join(lines)
