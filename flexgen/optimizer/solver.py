"""Policy search: one small program per block, over the nine placement fractions.

For a fixed block (gpu_batch_size x num_gpu_batches) and flag set, time and memory are
linear in (wg wc wd cg cc cd hg hc hd) (see `cost_model.BlockModel`), so the best
placement is a linear program: minimise prefill + (gen_len - 1) decode steps, each layer
step bounded below by its load, store and compute streams, subject to the memory budget
of every tier in both phases. The engine's all-or-nothing buffers (a layer's working
slots exist as soon as wg < 1, ...) add one binary each, so strictly it is a small mixed
integer program; CBC, shipped with pulp, solves either in milliseconds.

Around it, `search` enumerates blocks the way the original did (double the batch, double
then bisect the number of gpu batches), tries the compression and cpu_cache_compute
options the caller allows, rounds the best solutions to whole percents / whole rows the
engine can run, and keeps the best by the cost model's own estimate.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import pulp

from flexgen.errors import FlexGenError
from flexgen.models.base import ModelArgs
from flexgen.optimizer.budgets import TIER_NAMES, Budgets, _gib, _reserve_note, check_budgets  # noqa: F401
from flexgen.optimizer.cost_model import (DEFAULT_ENGINE, GIB, PHASES, VARS, BlockModel, EngineConstants,
                                          Estimate, Lin, evaluate, fractions_of)
from flexgen.optimizer.hardware import HardwareProfile
from flexgen.placement import split_rows
from flexgen.policy import Policy

# Candidate gpu batch sizes of the coarse pass: powers of two, as the original doubled
# them; the fine pass bisects between neighbours.
GBS_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
MAX_NUM_GPU_BATCHES = 1024
MAX_BLOCK = 1 << 15


# ---------------------------------------------------------------------------------------
# One LP.

# A program is built for one set of a policy's switches (compress_weight, compress_cache,
# cpu_cache_compute, overlap), given as a Policy whose placement and block are ignored:
# the program chooses those.

@dataclass
class LPSolution:
    gpu_batch_size: int
    num_gpu_batches: int
    flags: Policy                  # the switches it was solved for (see above)
    fractions: dict[str, float]
    total_time: float              # seconds for the whole block (prefill + decode)
    model: BlockModel

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def time_per_token(self) -> float:
        return self.total_time / (self.block_size * self.model.n)


def _upper_bound(e: Lin) -> float:
    """Largest value of `e` over the unit cube (a big-M for it)."""
    return e.const + sum(c for c in e.coef.values() if c > 0)


def build_lp(model: BlockModel, budgets: Budgets, fixed: dict[str, float] | None = None,
             slack: bool = False):
    """The program for one BlockModel: minimise the block's time subject to the budgets.
    Returns the problem, the fractions, the slacks and the block's time (an expression).

    Variables: the nine fractions, one time per distinct layer step and phase (bounded
    below by its load, store and compute streams), and one binary per all-or-nothing
    buffer (`Switched`), which must be 1 when its trigger is positive. Memory is in GiB.
    With `slack`, every tier's limit gets a slack variable and the objective is their
    sum: how far from feasible the block is.
    """
    prob = pulp.LpProblem("flexgen_policy", pulp.LpMinimize)
    x = {v: _variable(prob, v, lowBound=0, upBound=1) for v in VARS}
    for group in (("wg", "wc", "wd"), ("cg", "cc", "cd"), ("hg", "hc", "hd")):
        prob += pulp.lpSum(x[v] for v in group) == 1, f"sum_{group[0][0]}"
    for k, v in (fixed or {}).items():
        prob += x[k] == v, f"fixed_{k}"

    objective, traffic = [], []
    for phase in PHASES:
        reps = 1 if phase == "prefill" else model.decode_steps
        if reps == 0:
            continue
        for i, iv in enumerate(model.intervals[phase]):
            t = _variable(prob, f"T_{phase}_{i}", lowBound=0)
            streams = (iv.load, iv.store, iv.compute)
            if model.overlap:
                for j, e in enumerate(streams):
                    prob += t >= e.to_pulp(x), f"T_{phase}_{i}_{j}"
            else:
                prob += t >= (streams[0] + streams[1] + streams[2]).to_pulp(x), f"T_{phase}_{i}"
            objective.append(iv.count * reps * t)
            traffic.append((iv.load + iv.store).to_pulp(x) * (iv.count * reps))

    binaries: dict[str, pulp.LpVariable] = {}
    n_aux = [0]

    def term(tm):
        if isinstance(tm, Lin):
            return (tm / GIB).to_pulp(x)
        z = binaries.get(tm.key)
        if z is None:
            z = binaries[tm.key] = _variable(prob, f"z_{len(binaries)}", cat="Binary")
            prob.addConstraint(tm.trigger.to_pulp(x) <= z, f"trigger_{len(binaries)}")
        amount = tm.amount / GIB
        if not amount.coef:
            return amount.const * z
        n_aux[0] += 1
        w = _variable(prob, f"w_{n_aux[0]}", lowBound=0)
        prob.addConstraint(w >= amount.to_pulp(x) - _upper_bound(amount) * (1 - z), f"switched_{n_aux[0]}")
        return w

    slacks = {}
    if slack:
        slacks = {tier: _variable(prob, f"slack_{tier}", lowBound=0) for tier in TIER_NAMES}
        # Missing memory is asked of the cheapest tier that can take it: disk, then cpu, then gpu.
        prob += (pulp.lpSum(SLACK_WEIGHT[t] * v for t, v in slacks.items()) + 1e-9 * pulp.lpSum(objective))
    else:
        # Among placements of the same time, the one that moves the fewest bytes: where
        # compute bounds every step, the time alone leaves the LP free to put cache rows
        # off the gpu tier for nothing.
        prob += pulp.lpSum(objective) + TIE_BREAK * pulp.lpSum(traffic)
    for phase in PHASES:
        if phase == "decode" and model.decode_steps == 0:
            continue
        totals = {}
        for tier in TIER_NAMES:
            totals[tier] = pulp.lpSum(term(tm) for tm in model.memory_terms(phase, tier))
            rhs = budgets.of(tier) / GIB + (slacks[tier] if slack else 0)
            prob += totals[tier] <= rhs, f"mem_{phase}_{tier}"
        if budgets.combined is not None:
            prob += (totals["gpu"] + totals["cpu"] <= budgets.combined / GIB + (slacks["cpu"] if slack else 0),
                     f"mem_{phase}_combined")
    return prob, x, slacks, pulp.lpSum(objective)


SLACK_WEIGHT = {"disk": 1.0, "cpu": 10.0, "gpu": 100.0}
TIE_BREAK = 1e-6   # weight of the I/O streams' seconds against the block's


def _variable(prob, name, **kw):
    """A variable of `prob` (pulp >= 3.3 attaches it to the problem; older pulp has no method)."""
    add = getattr(prob, "add_variable", None)
    return add(name, **kw) if add else pulp.LpVariable(name, **kw)


def cbc_solver():
    """CBC as shipped with pulp, quiet. (pulp 3.3 deprecates the name, not the solver.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False)


def _solve(prob) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(cbc_solver())
    return pulp.LpStatus[status] == "Optimal"


def block_model(args: ModelArgs, prompt_len: int, gen_len: int, gpu_batch_size: int, num_gpu_batches: int,
                hw: HardwareProfile, flags: Policy, engine: EngineConstants = DEFAULT_ENGINE) -> BlockModel:
    return BlockModel(args, prompt_len, gen_len, gpu_batch_size, num_gpu_batches, hw,
                      compress_weight=flags.compress_weight, compress_cache=flags.compress_cache,
                      cpu_cache_compute=flags.cpu_cache_compute, overlap=flags.overlap, engine=engine)


def solve_block(args: ModelArgs, prompt_len: int, gen_len: int, gpu_batch_size: int, num_gpu_batches: int,
                hw: HardwareProfile, budgets: Budgets, flags: Policy, engine: EngineConstants = DEFAULT_ENGINE,
                fixed: dict[str, float] | None = None) -> LPSolution | None:
    """Best placement for one block and flag set, or None when no placement fits."""
    model = block_model(args, prompt_len, gen_len, gpu_batch_size, num_gpu_batches, hw, flags, engine)
    prob, x, _, block_time = build_lp(model, budgets, fixed)
    if not _solve(prob):
        return None
    fr = {v: min(1.0, max(0.0, x[v].value() or 0.0)) for v in VARS}
    return LPSolution(gpu_batch_size, num_gpu_batches, flags, fr, pulp.value(block_time), model)


# ---------------------------------------------------------------------------------------
# Rounding an LP solution to a policy the engine runs.

def _percent_candidates(frac: float) -> set[int]:
    p = 100 * frac
    return {max(0, min(100, int(math.floor(p + 1e-6)))), max(0, min(100, int(math.ceil(p - 1e-6))))}


def _percent_for_rows(gbs: int, rows: int, other_rows: int = 0) -> int | None:
    """A whole percent that gives exactly `rows` rows of a gpu batch under the engine's split."""
    guess = round(100 * rows / gbs)
    for p in (guess, guess - 1, guess + 1):
        if 0 <= p <= 100 and int(round(gbs * p / 100)) == rows:
            return p
    return None


def _row_pairs(gbs: int, g: float, c: float) -> set[tuple[int, int]]:
    """Candidate (gpu %, cpu %) pairs for rows split with fractions (g, c)."""
    out = set()
    for pg in _percent_candidates(g):
        for pc in _percent_candidates(c):
            if pg + pc <= 100:
                out.add((pg, pc))
    for rg in {math.floor(gbs * g + 1e-6), math.ceil(gbs * g - 1e-6)}:
        for rc in {math.floor(gbs * c + 1e-6), math.ceil(gbs * c - 1e-6)}:
            if rg + rc > gbs:
                continue
            pg, pc = _percent_for_rows(gbs, rg), _percent_for_rows(gbs, rc)
            if pg is not None and pc is not None and pg + pc <= 100:
                out.add((pg, pc))
    return out


def round_solution(sol: LPSolution, args: ModelArgs, hw: HardwareProfile, budgets: Budgets,
                   engine: EngineConstants = DEFAULT_ENGINE) -> tuple[Policy, Estimate] | None:
    """The best feasible whole-percent policy next to an LP solution."""
    fr, b = sol.fractions, sol.gpu_batch_size
    w_pairs = {(pg, pc) for pg in _percent_candidates(fr["wg"]) for pc in _percent_candidates(fr["wc"])
               if pg + pc <= 100}
    c_pairs = _row_pairs(b, fr["cg"], fr["cc"])
    h_pairs = _row_pairs(b, fr["hg"], fr["hc"])
    model = sol.model
    best = None
    seen = set()
    for (wg, wc), (cg, cc), (hg, hc) in itertools.product(w_pairs, c_pairs, h_pairs):
        policy = dataclasses.replace(sol.flags, gpu_batch_size=b, num_gpu_batches=sol.num_gpu_batches,
                                     w_gpu_percent=float(wg), w_cpu_percent=float(wc),
                                     cache_gpu_percent=float(cg), cache_cpu_percent=float(cc),
                                     act_gpu_percent=float(hg), act_cpu_percent=float(hc))
        x = fractions_of(policy)
        key = tuple(round(x[v], 9) for v in VARS)
        if key in seen:
            continue
        seen.add(key)
        est = evaluate(model, x, policy)
        if check_budgets(est, budgets):
            continue
        if best is None or est.throughput > best[1].throughput:
            best = (policy, est)
    if best is not None:
        policy = canonical_percents(best[0])
        best = (policy, best[1])
        best[1].policy = policy
    return best


def canonical_percents(policy: Policy) -> Policy:
    """The same placement with the plainest whole percents: rows split as before, but e.g.
    100/0 rather than 99/0 when 99 % of a small batch already rounds to every row."""
    d = policy.to_dict()
    b = policy.gpu_batch_size
    for kind in ("cache", "act"):
        g, c = d[f"{kind}_gpu_percent"], d[f"{kind}_cpu_percent"]
        rows = split_rows(b, g, c)
        pg = _percent_for_rows(b, rows.gpu)
        if pg is None:
            continue
        pc = 100 - pg if rows.disk == 0 else _percent_for_rows(b, rows.cpu)
        if pc is None or pg + pc > 100 or split_rows(b, pg, pc) != rows:
            continue
        d[f"{kind}_gpu_percent"], d[f"{kind}_cpu_percent"] = float(pg), float(pc)
    return Policy.from_dict(d)


# ---------------------------------------------------------------------------------------
# The search.

class _BlockSearch:
    """LP solves for one flag set, memoised by block."""

    def __init__(self, args, prompt_len, gen_len, hw, budgets, flags, engine):
        self.args, self.s, self.n, self.hw, self.budgets = args, prompt_len, gen_len, hw, budgets
        self.flags, self.engine = flags, engine
        self.solves = 0   # programs solved (the memo holds each block once)
        self.memo: dict[tuple[int, int], LPSolution | None] = {}
        self.best_ngb_of: dict[int, int | None] = {}

    def solve(self, gbs: int, ngb: int) -> LPSolution | None:
        key = (gbs, ngb)
        if key not in self.memo:
            if gbs < 1 or ngb < 1 or gbs * ngb > MAX_BLOCK or ngb > MAX_NUM_GPU_BATCHES:
                self.memo[key] = None
            else:
                self.solves += 1
                self.memo[key] = solve_block(self.args, self.s, self.n, gbs, ngb, self.hw, self.budgets,
                                             self.flags, self.engine)
        return self.memo[key]

    def cost(self, gbs: int, ngb: int) -> float:
        """Seconds per generated token (inf when the block does not fit)."""
        sol = self.solve(gbs, ngb)
        return math.inf if sol is None else sol.time_per_token

    def coarse_ngb(self, gbs: int) -> int | None:
        """Double the number of gpu batches while it fits and keeps helping."""
        if gbs in self.best_ngb_of:
            return self.best_ngb_of[gbs]
        if self.solve(gbs, 1) is None:
            self.best_ngb_of[gbs] = None
            return None
        best, best_cost, ngb = 1, self.cost(gbs, 1), 1
        while True:
            ngb *= 2
            c = self.cost(gbs, ngb)
            if c >= best_cost:   # no longer fits, or no longer helps
                break
            best, best_cost = ngb, c
        self.best_ngb_of[gbs] = best
        return best

    def refine_ngb(self, gbs: int, start: int) -> int:
        """Bisect around `start` (to within about 1/16 of it)."""
        best = _hill_climb(lambda k: self.cost(gbs, k), start, lo=1, hi=MAX_NUM_GPU_BATCHES,
                           step=max(1, start // 2), min_step=max(1, start // 16))
        self.best_ngb_of[gbs] = best
        return best


def _hill_climb(cost, start: int, lo: int, hi: int, step: int, min_step: int = 1) -> int:
    """Integer local search with halving steps (the bisection of the original's search)."""
    best, best_cost = start, cost(start)
    while step >= min_step:
        moved = False
        for cand in (best - step, best + step):
            if lo <= cand <= hi:
                c = cost(cand)
                if c < best_cost:
                    best, best_cost, moved = cand, c, True
                    break
        if not moved:
            step //= 2
    return best


def _flag_sets(allow_compress_weight: bool, allow_compress_cache: bool, cpu_cache_compute: bool | None,
               overlap: bool) -> list[Policy]:
    cw = (False, True) if allow_compress_weight else (False,)
    cc = (False, True) if allow_compress_cache else (False,)
    ccc = (False, True) if cpu_cache_compute is None else (cpu_cache_compute,)
    return [Policy(compress_weight=a, compress_cache=b, cpu_cache_compute=c, overlap=overlap)
            for a, b, c in itertools.product(cw, cc, ccc)]


@dataclass
class SearchResult:
    policy: Policy
    estimate: Estimate
    lp_solves: int
    candidates: list[tuple[Policy, Estimate]] = field(default_factory=list)


def search_detailed(model_args: ModelArgs, prompt_len: int, gen_len: int, hw: HardwareProfile,
                    gpu_mem: float | None = None, cpu_mem: float | None = None, disk_mem: float | None = None,
                    allow_compress_weight: bool = False, allow_compress_cache: bool = False,
                    cpu_cache_compute: bool | None = None, overlap: bool = True,
                    gpu_batch_size: int | None = None, num_gpu_batches: int | None = None,
                    engine: EngineConstants = DEFAULT_ENGINE, refine: int = 2) -> SearchResult:
    """`search`, also returning the runner-up policies and the number of LPs solved.

    Coarse pass, per flag set: gpu batch sizes from GBS_CANDIDATES (stopping at the first
    that does not fit, or once two in a row are clearly worse than the best), and for
    each the number of gpu batches doubled while it fits and helps. Fine pass, for the
    `refine` best flag sets: bisect the number of gpu batches, then the batch size
    between its neighbours. Finally the best LP solutions are rounded to whole percents
    and rows, and the best by the cost model's estimate wins.
    """
    if prompt_len < 1 or gen_len < 1:
        raise FlexGenError("prompt and generation lengths must be >= 1")
    if prompt_len + gen_len > model_args.max_position_embeddings:
        raise FlexGenError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds the model's "
                           f"{model_args.max_position_embeddings} positions")
    for name, v in (("gpu_batch_size", gpu_batch_size), ("num_gpu_batches", num_gpu_batches)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise FlexGenError(f"{name} must be an integer >= 1, got {v!r}")
    budgets = Budgets.from_request(hw, gpu_mem, cpu_mem, disk_mem)
    flag_sets = _flag_sets(allow_compress_weight, allow_compress_cache, cpu_cache_compute, overlap)
    gbs_list = (gpu_batch_size,) if gpu_batch_size is not None else GBS_CANDIDATES

    # Coarse pass.
    searches: dict[Policy, _BlockSearch] = {}
    coarse: dict[Policy, tuple[float, int, int]] = {}
    for flags in flag_sets:
        bs = searches[flags] = _BlockSearch(model_args, prompt_len, gen_len, hw, budgets, flags, engine)
        best = None
        worse = 0
        for gbs in gbs_list:
            if num_gpu_batches is not None:
                ngb = num_gpu_batches if bs.solve(gbs, num_gpu_batches) is not None else None
                bs.best_ngb_of[gbs] = ngb
            else:
                ngb = bs.coarse_ngb(gbs)
            if ngb is None:
                break   # memory only grows with the batch: larger ones cannot fit either
            c = bs.cost(gbs, ngb)
            if best is None or c < best[0]:
                best, worse = (c, gbs, ngb), 0
            elif c > 1.1 * best[0]:
                worse += 1
                if worse >= 2:
                    break
        if best is not None:
            coarse[flags] = best
    if not coarse:
        raise FlexGenError(infeasible_message(model_args, prompt_len, gen_len, hw, budgets, flag_sets,
                                              gpu_batch_size or 1, num_gpu_batches or 1, engine))

    # Fine pass for the most promising flag sets.
    for flags in sorted(coarse, key=lambda f: coarse[f][0])[:refine]:
        bs = searches[flags]
        _, gbs, ngb = coarse[flags]
        if num_gpu_batches is None:
            ngb = bs.refine_ngb(gbs, ngb)
        if gpu_batch_size is None:
            i = GBS_CANDIDATES.index(gbs)
            lo = GBS_CANDIDATES[i - 1] if i > 0 else 1
            hi = GBS_CANDIDATES[i + 1] if i + 1 < len(GBS_CANDIDATES) else gbs

            def cost_of_gbs(g, bs=bs, gbs0=gbs, ngb0=ngb):
                if g not in bs.best_ngb_of:
                    if num_gpu_batches is not None:
                        bs.best_ngb_of[g] = num_gpu_batches if bs.solve(g, num_gpu_batches) else None
                    else:
                        # Start from the same block size; a short bisection adjusts it.
                        start = max(1, round(ngb0 * gbs0 / g))
                        if bs.solve(g, start) is None:
                            start = 1
                        if bs.solve(g, start) is None:
                            bs.best_ngb_of[g] = None
                        else:
                            bs.best_ngb_of[g] = _hill_climb(lambda k: bs.cost(g, k), start, 1,
                                                            MAX_NUM_GPU_BATCHES, max(1, start // 4),
                                                            max(1, start // 8))
                k = bs.best_ngb_of[g]
                return math.inf if k is None else bs.cost(g, k)

            _hill_climb(cost_of_gbs, gbs, lo, hi, max(1, (hi - lo) // 4))

    # Round the most promising LP solutions; keep the best feasible policy.
    sols = sorted((s for bs in searches.values() for s in bs.memo.values() if s is not None),
                  key=lambda s: s.time_per_token)
    rounded = []
    for s in sols:   # the 8 best that round; further down only while none has
        r = round_solution(s, model_args, hw, budgets, engine)
        if r is not None:
            rounded.append(r)
            if len(rounded) == 8:
                break
    if not rounded:
        raise FlexGenError("the linear program found placements, but none survives rounding to whole "
                           "percents within the budgets; give a little more memory")
    # Best first; within NEAR_TIE of the best prefer fewer flags, then fewer bytes moved
    # between tiers: simpler to run, nothing measurable to gain.
    rounded.sort(key=lambda r: -r[1].throughput)
    top = rounded[0][1].throughput * (1 - NEAR_TIE)
    pick = min((r for r in rounded if r[1].throughput >= top), key=lambda r: (_n_flags(r[0]), _bytes_moved(r[1])))
    rounded.remove(pick)
    rounded.insert(0, pick)
    policy, est = pick
    return SearchResult(policy, est, sum(bs.solves for bs in searches.values()), rounded)


NEAR_TIE = 1e-3   # predicted throughputs this close are the same for the choice


def _bytes_moved(est: Estimate) -> float:
    return sum(sum(links.values()) for links in est.io_bytes.values())


def _n_flags(p: Policy) -> int:
    return int(p.compress_weight) + int(p.compress_cache) + int(p.cpu_cache_compute)


def search(model_args: ModelArgs, prompt_len: int, gen_len: int, hw: HardwareProfile,
           gpu_mem: float | None = None, cpu_mem: float | None = None, disk_mem: float | None = None,
           allow_compress_weight: bool = False, allow_compress_cache: bool = False,
           cpu_cache_compute: bool | None = None, overlap: bool = True,
           gpu_batch_size: int | None = None, num_gpu_batches: int | None = None,
           engine: EngineConstants = DEFAULT_ENGINE) -> tuple[Policy, Estimate]:
    """The policy with the highest predicted throughput within the memory budgets.

    Budgets are bytes as the user gave them (None: the profile's capacities); the
    profile's `gpu_reserved` / `cpu_reserved` are subtracted. Compression is tried only
    where allowed; cpu_cache_compute is tried both ways unless given. A fixed
    gpu_batch_size and/or num_gpu_batches restricts the block. Raises FlexGenError naming
    the binding budget when nothing fits.
    """
    r = search_detailed(model_args, prompt_len, gen_len, hw, gpu_mem, cpu_mem, disk_mem,
                        allow_compress_weight, allow_compress_cache, cpu_cache_compute, overlap,
                        gpu_batch_size, num_gpu_batches, engine)
    return r.policy, r.estimate


def infeasible_message(args: ModelArgs, prompt_len: int, gen_len: int, hw: HardwareProfile, budgets: Budgets,
                       flag_sets: Iterable[Policy], gbs: int = 1, ngb: int = 1,
                       engine: EngineConstants = DEFAULT_ENGINE) -> str:
    """Why nothing fits: the least extra memory (per tier) that makes the smallest block fit."""
    best = None
    for flags in flag_sets:
        model = block_model(args, prompt_len, gen_len, gbs, ngb, hw, flags, engine)
        prob, x, slacks, _ = build_lp(model, budgets, slack=True)
        if not _solve(prob):
            continue
        total = sum(s.value() or 0.0 for s in slacks.values())
        if best is None or total < best[0]:
            fr = {v: x[v].value() or 0.0 for v in VARS}
            best = (total, {t: (slacks[t].value() or 0.0) * GIB for t in TIER_NAMES}, model, fr, flags)
    if best is None:
        return "no placement fits the memory budgets"
    _, short, model, fr, flags = best
    parts = []
    for tier in TIER_NAMES:
        if short[tier] <= 0.01 * GIB:
            continue
        need = budgets.of(tier) + short[tier]
        phase = max(PHASES if model.decode_steps else ("prefill",),
                    key=lambda p: model.memory_total(p, tier, fr))
        comps = {k: v.value(fr) for k, v in model.memory[phase][tier].items()}
        what = max(comps, key=comps.get)
        parts.append(f"needs at least {_gib(need)} of {tier} memory (mostly for the {what}, in {phase}) even "
                     f"at gpu batch size {gbs} x {ngb}; {_reserve_note(budgets, tier)}: "
                     f"{_gib(short[tier])} more needed")
    if not parts:
        parts.append("the budgets are too tight for the smallest block")
    hint = ""
    if not any(f.compress_weight and f.compress_cache for f in flag_sets):
        hint = " (4-bit compression of weights and cache, if allowed, shrinks them to about 28%)"
    return f"{args.name}, prompt {prompt_len} + {gen_len}: " + "; ".join(parts) + hint
