"""The cost model of a pipeline of N stages (flexgen/pipeline.py runs it).

Each stage holds a contiguous slice of the layers (`split_layers`, by bytes and FLOPs) and runs,
per token step, one group of `num_gpu_batches / G` gpu batches at a time (G = groups =
min(N, num_gpu_batches)): its time per group is the single-process cost model's block
time over its layers with that group as the block. A group's hand-off to the next stage
costs latency + bytes / bandwidth of the link.

Decode: group g's step i + 1 starts on stage 0 only when its step i has left the last
stage, so the step period is the larger of the busiest stage's work (G groups) and one
group's round trip (every stage once plus N hand-offs):
    period = max(G x max_s t_s, sum_s t_s + N x link).
The bubble is the share of stage time lost to waiting: 1 - sum_s G t_s / (N x period).
Prefill fills and drains the pipe once: sum_s t_s + (N - 1) link + (G - 1) max_s t_s.
Stages on one machine read and write one disk: per phase, each link of that disk must
carry every co-located stage's traffic (G groups each), which bounds the step period and
the prefill from below.

`search_pipeline` chooses every stage's policy: all stages share the block (gpu batch
size and number of gpu batches: the micro-batching must agree) and the weight
compression (it decides the split), so it searches blocks as the single-process search
does; at each block, every stage's placement is the linear program of that stage alone
(its layers, its share of the KV cache, its memory budgets; time: one group, memory: the
whole block), and the block with the highest predicted pipeline throughput wins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

from flexgen.models.base import ModelArgs
from flexgen.optimizer.cost_model import BlockModel, Estimate, evaluate, fractions_of
from flexgen.optimizer.hardware import HardwareProfile
from flexgen.policy import Policy
from flexgen.stages import micro_batch_groups, split_layers, stage_costs

@dataclass
class StageEstimate:
    stage: int
    layers: tuple                # (start, stop) in the layer list
    policy: Policy
    prefill_group_s: float       # one group through this stage's layers, prefill
    decode_group_s: float        # one group, one decode step
    memory: dict                 # peak bytes per tier (the KV cache of the whole block)
    estimate: Estimate           # the single-process estimate of one group (bottlenecks, I/O)
    block_estimate: Optional[Estimate] = None   # of the whole block over this stage's layers (memory)


@dataclass
class PipelineEstimate:
    num_stages: int
    groups: int
    link_bw: float
    link_latency: float
    prefill_time: float
    decode_time: float
    throughput: float            # generated token/s of the whole pipeline
    decode_period: float         # seconds per token step in decode
    bubble: float                # share of stage time spent waiting in decode
    stages: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = [{"stage": s.stage, "layers": list(s.layers), "policy": s.policy.to_dict(),
                        "prefill_group_s": s.prefill_group_s, "decode_group_s": s.decode_group_s,
                        "memory": s.memory, "bottleneck": s.estimate.bottleneck} for s in self.stages]
        return d


DISK_LINKS = ("disk->cpu", "cpu->disk")


def _shared_disk_time(stages: list, hosts: Optional[Sequence], phase: str, steps: int, G: int) -> float:
    """The least time per step (decode) or per phase (prefill) that the busiest machine's
    disk needs for the traffic of all its stages; 0 when every stage has its own disk."""
    if hosts is None:
        return 0.0
    worst = 0.0
    for h in set(hosts):
        on = [s for s, k in zip(stages, hosts) if k == h]
        if len(on) > 1:
            worst = max(worst, max(G * sum(s.estimate.busy_time[phase][k] for s in on) / steps for k in DISK_LINKS))
    return worst


def estimate_pipeline(args: ModelArgs, policies: Sequence[Policy], prompt_len: int, gen_len: int,
                      hw: HardwareProfile, num_stages: int, link_bw: Optional[float] = None,
                      link_latency: Optional[float] = None, hosts: Optional[Sequence] = None) -> PipelineEstimate:
    """Predict a pipeline of `num_stages` stages; policies: one for all, or one per stage.
    The link between stages: link_bw (bytes/s) and link_latency (s), else the profile's.
    hosts: the machine of each stage (stages with the same one share its disk); None:
    every stage has a disk of its own."""
    bw = link_bw or hw.link_bw
    lat = hw.link_latency if link_latency is None else link_latency
    N = num_stages
    pols = list(policies) * N if len(policies) == 1 else list(policies)
    p0 = pols[0]
    import torch

    # The engine's own stage split, so that the prediction is of the stages it will run.
    # Imported here: flexgen.pipeline imports the scheduler, and the optimizer package
    # itself must not depend on the engine.
    spans = split_layers(stage_costs(args, getattr(torch, hw.compute_dtype), p0.compress_weight), N)
    groups = micro_batch_groups(p0.num_gpu_batches, N)
    G, nb_g = len(groups), max(len(g) for g in groups)
    stages = []
    for s, (span, pol) in enumerate(zip(spans, pols)):
        kw = dict(compress_weight=pol.compress_weight, compress_cache=pol.compress_cache,
                  cpu_cache_compute=pol.cpu_cache_compute, overlap=pol.overlap, span=(span.start, span.stop))
        group_pol = dataclasses.replace(pol, num_gpu_batches=nb_g)
        est = evaluate(BlockModel(args, prompt_len, gen_len, pol.gpu_batch_size, nb_g, hw, **kw),
                       fractions_of(group_pol), group_pol)
        full = evaluate(BlockModel(args, prompt_len, gen_len, pol.gpu_batch_size, pol.num_gpu_batches, hw, **kw),
                        fractions_of(pol), pol)
        stages.append(StageEstimate(s, (span.start, span.stop), pol, est.prefill_time,
                                    est.decode_time / max(1, gen_len - 1), dict(full.memory), est, full))
    row = args.hidden_size * hw.dtype_bytes * p0.gpu_batch_size * nb_g
    link_pre = lat * (nb_g + 1) + row * prompt_len / bw
    link_dec = lat * (nb_g + 2) + row / bw
    pre = [s.prefill_group_s for s in stages]
    dec = [s.decode_group_s for s in stages]
    prefill = max(sum(pre) + (N - 1) * link_pre + (G - 1) * max(pre),
                  _shared_disk_time(stages, hosts, "prefill", 1, G))
    period = max(G * max(dec), sum(dec) + (N * link_dec if N > 1 else 0.0),
                 _shared_disk_time(stages, hosts, "decode", max(1, gen_len - 1), G))
    decode = (gen_len - 1) * period
    B = p0.gpu_batch_size * p0.num_gpu_batches
    total = prefill + decode
    bubble = 1 - sum(G * t for t in dec) / (N * period) if period > 0 else 0.0
    return PipelineEstimate(N, G, bw, lat, prefill, decode, B * gen_len / total if total else 0.0, period,
                            bubble, stages)


def format_pipeline(pe: PipelineEstimate, title: str) -> str:
    lines = [title,
             f"{pe.num_stages} stages, {pe.groups} groups of gpu batches in flight; link "
             f"{pe.link_bw / 1e9:.2f} GB/s, {pe.link_latency * 1e6:.0f} us",
             f"{'stage':<6} {'layers':>8} {'prefill/group':>14} {'decode/group':>13} {'bottleneck':>16} "
             f"{'gpu GiB':>8} {'cpu GiB':>8} {'disk GiB':>9}"]
    for s in pe.stages:
        m = s.memory
        lines.append(f"{s.stage:<6} {s.layers[0]:>3}-{s.layers[1] - 1:<4} {s.prefill_group_s:>13.4f}s "
                     f"{s.decode_group_s:>12.4f}s {s.estimate.bottleneck.get('decode', '-'):>16} "
                     f"{m['gpu'] / 2**30:>8.2f} {m['cpu'] / 2**30:>8.2f} {m['disk'] / 2**30:>9.2f}")
    p0 = pe.stages[0].policy
    lines.append(f"block: gpu batch size {p0.gpu_batch_size} x {p0.num_gpu_batches} gpu batches on every stage")
    for s in pe.stages:
        pol = s.policy
        flags = [f.replace("_", "-") for f in ("cpu_cache_compute", "compress_weight", "compress_cache")
                 if getattr(pol, f)]
        lines.append(f"stage {s.stage} policy: --percent {' '.join(f'{v:g}' for v in pol.percent)}"
                     + (f" --{' --'.join(flags)}" if flags else ""))
    lines.append(f"prefill {pe.prefill_time:.3f} s, decode {pe.decode_time:.3f} s "
                 f"({pe.decode_period:.4f} s per step, bubble {100 * pe.bubble:.0f} %)")
    lines.append(f"predicted throughput {pe.throughput:.2f} token/s")
    return "\n".join(lines)


# -- choosing every stage's policy ----------------------------------------------------------

class _StageLP:
    """What `solver.build_lp` reads of a model: one group's time (a stage runs the block
    group by group) and the whole block's memory (it holds the whole block's KV cache)."""

    def __init__(self, group: BlockModel, full: BlockModel):
        self.intervals, self.decode_steps, self.overlap = group.intervals, group.decode_steps, group.overlap
        self.memory_terms = full.memory_terms


@dataclass
class PipelinePlan:
    """Every stage's policy (one block for all) and the pipeline's prediction."""
    estimate: PipelineEstimate
    budgets: list                 # Budgets per stage, as searched
    lp_solves: int

    @property
    def policies(self) -> list[Policy]:
        return [s.policy for s in self.estimate.stages]


def _stage_models(args, prompt_len, gen_len, hw, gbs, ngb, nb_g, flags, span, engine):
    kw = dict(compress_weight=flags.compress_weight, compress_cache=flags.compress_cache,
              cpu_cache_compute=flags.cpu_cache_compute, overlap=flags.overlap, engine=engine, span=span)
    group = BlockModel(args, prompt_len, gen_len, gbs, nb_g, hw, **kw)
    full = group if nb_g == ngb else BlockModel(args, prompt_len, gen_len, gbs, ngb, hw, **kw)
    return group, full


def _solve_stage(args, prompt_len, gen_len, hw, budgets, gbs, ngb, nb_g, flags, span, engine, counter):
    """The best whole-percent policy of one stage at this block and flag set, with the
    predicted time of one group through it; None when nothing fits its budgets."""
    import itertools

    from flexgen.optimizer.budgets import check_budgets
    from flexgen.optimizer.cost_model import VARS
    from flexgen.optimizer.solver import _percent_candidates, _row_pairs, _solve, build_lp, canonical_percents

    group, full = _stage_models(args, prompt_len, gen_len, hw, gbs, ngb, nb_g, flags, span, engine)
    prob, x, _, _ = build_lp(_StageLP(group, full), budgets)
    counter[0] += 1
    if not _solve(prob):
        return None
    fr = {v: min(1.0, max(0.0, x[v].value() or 0.0)) for v in VARS}
    w_pairs = sorted((pg, pc) for pg in _percent_candidates(fr["wg"]) for pc in _percent_candidates(fr["wc"])
                     if pg + pc <= 100)
    best, seen = None, set()
    for (wg, wc), (cg, cc), (hg, hc) in itertools.product(w_pairs, sorted(_row_pairs(gbs, fr["cg"], fr["cc"])),
                                                          sorted(_row_pairs(gbs, fr["hg"], fr["hc"]))):
        pol = Policy(gpu_batch_size=gbs, num_gpu_batches=ngb, w_gpu_percent=float(wg), w_cpu_percent=float(wc),
                     cache_gpu_percent=float(cg), cache_cpu_percent=float(cc), act_gpu_percent=float(hg),
                     act_cpu_percent=float(hc), overlap=flags.overlap, cpu_cache_compute=flags.cpu_cache_compute,
                     compress_weight=flags.compress_weight, compress_cache=flags.compress_cache)
        xs = fractions_of(pol)
        key = tuple(round(xs[v], 9) for v in VARS)
        if key in seen:
            continue
        seen.add(key)
        if check_budgets(evaluate(full, xs, pol), budgets):
            continue
        t = evaluate(group, xs, pol).total_time
        if best is None or t < best[1] * (1 - 1e-12):
            best = (pol, t)
    return None if best is None else (canonical_percents(best[0]), best[1])


def _stage_shortfall(args, prompt_len, gen_len, hw, budgets, gbs, ngb, nb_g, flags, span, engine) -> str:
    """What a stage lacks at this block: the least extra memory per tier (the slack LP)."""
    from flexgen.optimizer.budgets import TIERS, _gib
    from flexgen.optimizer.cost_model import GIB
    from flexgen.optimizer.solver import _solve, build_lp

    group, full = _stage_models(args, prompt_len, gen_len, hw, gbs, ngb, nb_g, flags, span, engine)
    prob, _, slacks, _ = build_lp(_StageLP(group, full), budgets, slack=True)
    if not _solve(prob):
        return "no placement fits"
    short = [f"{_gib(v) if v >= 0.1 * GIB else f'{v / 2**20:.1f} MiB'} more {t} memory"
             for t in TIERS for v in [(slacks[t].value() or 0.0) * GIB] if v > 1]
    return "needs " + ", ".join(short) if short else "the budgets are too tight"


def search_pipeline(args: ModelArgs, prompt_len: int, gen_len: int, hw: HardwareProfile, num_stages: int,
                    budgets: Sequence, *, allow_compress_weight: bool = False, allow_compress_cache: bool = False,
                    cpu_cache_compute: Optional[bool] = None, overlap: bool = True,
                    gpu_batch_size: Optional[int] = None, num_gpu_batches: Optional[int] = None,
                    link_bw: Optional[float] = None, link_latency: Optional[float] = None,
                    hosts: Optional[Sequence] = None, engine=None) -> PipelinePlan:
    """Every stage's policy for a pipeline of `num_stages` stages, each within its own
    budgets (`solver.Budgets`, one for all stages or one per stage).

    All stages share the block (gpu_batch_size x num_gpu_batches) and weight compression.
    Blocks are searched as the single-process search does (gpu batch sizes doubled; per
    size, the number of gpu batches through powers of two and the multiples of
    num_stages, then bisected; then the batch size between its neighbours). At each
    block every stage solves its own linear program (its layers: the input embedding
    on the first, the head on the last; its share of the KV cache; its budgets), trying
    the cache compression and cpu_cache_compute options the caller allows, and keeps
    the placement that moves one group through it fastest. The block's value is the
    pipeline's predicted throughput (`estimate_pipeline`: slowest stage, bubble, link,
    the disk that stages on one machine share (`hosts`)); the best wins. Deterministic: the same inputs give the same plan.
    """
    import math

    import torch

    from flexgen.errors import FlexGenError
    from flexgen.optimizer.cost_model import DEFAULT_ENGINE
    from flexgen.optimizer.solver import GBS_CANDIDATES, MAX_BLOCK, MAX_NUM_GPU_BATCHES, _hill_climb

    engine = engine or DEFAULT_ENGINE
    N = num_stages
    if prompt_len < 1 or gen_len < 1:
        raise FlexGenError("prompt and generation lengths must be >= 1")
    if prompt_len + gen_len > args.max_position_embeddings:
        raise FlexGenError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds the model's "
                           f"{args.max_position_embeddings} positions")
    budgets = list(budgets)
    if len(budgets) == 1:
        budgets *= N
    if len(budgets) != N:
        raise FlexGenError(f"{len(budgets)} budgets for {N} pipeline stages")
    counter = [0]   # LP solves
    dtype = getattr(torch, hw.compute_dtype)
    ccs = (False, True) if allow_compress_cache else (False,)
    cccs = (False, True) if cpu_cache_compute is None else (cpu_cache_compute,)
    gbs_list = (gpu_batch_size,) if gpu_batch_size is not None else GBS_CANDIDATES
    pow2 = [2 ** k for k in range(11)]
    ngb_seq = ((num_gpu_batches,) if num_gpu_batches is not None else
               sorted({k for k in pow2 + [N * k for k in pow2] if k <= MAX_NUM_GPU_BATCHES}))
    best_overall = None
    spans_of = {}

    for cw in ((False, True) if allow_compress_weight else (False,)):
        spans = spans_of[cw] = [(s.start, s.stop) for s in split_layers(stage_costs(args, dtype, cw), N)]
        flag_sets = [Policy(compress_weight=cw, compress_cache=cc, cpu_cache_compute=ccc, overlap=overlap)
                     for cc in ccs for ccc in cccs]
        memo: dict = {}

        def plan(gbs: int, ngb: int, spans=spans, flag_sets=flag_sets, memo=memo):
            key = (gbs, ngb)
            if key in memo:
                return memo[key]
            memo[key] = None
            if gbs < 1 or ngb < 1 or gbs * ngb > MAX_BLOCK or ngb > MAX_NUM_GPU_BATCHES:
                return None
            nb_g = max(len(g) for g in micro_batch_groups(ngb, N))
            pols = []
            for s, span in enumerate(spans):
                best = None
                for flags in flag_sets:   # plain first: a flag must be strictly better
                    r = _solve_stage(args, prompt_len, gen_len, hw, budgets[s], gbs, ngb, nb_g, flags, span,
                                     engine, counter)
                    if r is not None and (best is None or r[1] < best[1] * (1 - 1e-9)):
                        best = r
                if best is None:
                    return None
                pols.append(best[0])
            memo[key] = estimate_pipeline(args, pols, prompt_len, gen_len, hw, N, link_bw, link_latency, hosts)
            return memo[key]

        def cost(gbs: int, ngb: int, plan=plan) -> float:
            pe = plan(gbs, ngb)
            return math.inf if pe is None or pe.throughput <= 0 else 1.0 / pe.throughput

        # Coarse pass.
        best, worse = None, 0
        for gbs in gbs_list:
            here = None
            stale = 0
            for ngb in ngb_seq:
                c = cost(gbs, ngb)
                if c == math.inf:
                    break     # memory only grows with the block
                if here is None or c < here[0]:
                    here, stale = (c, ngb), 0
                else:
                    stale += 1
                    if stale >= 2:
                        break
            if here is None:
                break         # nor can a larger gpu batch fit
            if best is None or here[0] < best[0]:
                best, worse = (here[0], gbs, here[1]), 0
            elif here[0] > 1.1 * best[0]:
                worse += 1
                if worse >= 2:
                    break
        if best is None:
            continue
        # Fine pass: bisect the number of gpu batches, then the batch size between its neighbours.
        _, gbs, ngb = best
        if num_gpu_batches is None:
            ngb = _hill_climb(lambda k: cost(gbs, k), ngb, 1, MAX_NUM_GPU_BATCHES, max(1, ngb // 2),
                              max(1, ngb // 16))
        if gpu_batch_size is None:
            i = GBS_CANDIDATES.index(gbs)
            lo = GBS_CANDIDATES[i - 1] if i > 0 else 1
            hi = GBS_CANDIDATES[i + 1] if i + 1 < len(GBS_CANDIDATES) else gbs
            gbs = _hill_climb(lambda g: cost(g, ngb), gbs, lo, hi, max(1, (hi - lo) // 4))
        c = cost(gbs, ngb)
        if best_overall is None or c < best_overall[0] * (1 - 1e-6):
            best_overall = (c, memo[(gbs, ngb)])

    if best_overall is None:
        gbs, ngb = gpu_batch_size or 1, num_gpu_batches or 1
        nb_g = max(len(g) for g in micro_batch_groups(ngb, N))
        flags = Policy(compress_weight=allow_compress_weight, compress_cache=allow_compress_cache,
                       cpu_cache_compute=bool(cpu_cache_compute), overlap=overlap)
        spans = spans_of[allow_compress_weight]
        parts = [f"stage {s} (layers {a}-{b - 1}): "
                 + _stage_shortfall(args, prompt_len, gen_len, hw, budgets[s], gbs, ngb, nb_g, flags, (a, b), engine)
                 for s, (a, b) in enumerate(spans)
                 if _solve_stage(args, prompt_len, gen_len, hw, budgets[s], gbs, ngb, nb_g, flags, (a, b),
                                 engine, counter) is None]
        raise FlexGenError(f"{args.name}, prompt {prompt_len} + {gen_len}, {N} pipeline stages: no block fits "
                           f"every stage's budgets; at gpu batch size {gbs} x {ngb}, " + "; ".join(parts))
    return PipelinePlan(best_overall[1], budgets, counter[0])


def plan_for_ranks(args: ModelArgs, prompt_len: int, gen_len: int, hw: HardwareProfile, device, gpu_mem: float,
                   cpu_mem: float, disk_mem: float, **search_kw) -> PipelinePlan:
    """Under torchrun: every rank's budgets (bytes, this process's own) and machine are
    gathered, rank 0 searches the plan with its hardware profile (ranks on one machine
    share its disk) and sends it to all, so every rank runs its stage of one plan.
    Collective: every rank calls it."""
    import socket

    import torch.distributed as dist

    from flexgen import pipeline
    from flexgen.errors import FlexGenError
    from flexgen.optimizer.budgets import Budgets

    pipeline.init_process_group(str(device))
    n, r = dist.get_world_size(), dist.get_rank()
    asked = [None] * n
    with pipeline._peer_errors(r, n):
        dist.all_gather_object(asked, (gpu_mem, cpu_mem, disk_mem, socket.gethostname()))
    out = [None]
    if r == 0:
        try:
            budgets = [Budgets.from_request(hw, *b[:3]) for b in asked]
            out = [search_pipeline(args, prompt_len, gen_len, hw, n, budgets, hosts=[b[3] for b in asked],
                                   **search_kw)]
        except Exception as e:   # every rank raises it, rather than waiting for a plan
            out = [f"{e}" if isinstance(e, FlexGenError) else f"{type(e).__name__}: {e}"]
    with pipeline._peer_errors(r, n):
        dist.broadcast_object_list(out, src=0)
    if isinstance(out[0], str):
        raise FlexGenError(out[0])
    return out[0]
