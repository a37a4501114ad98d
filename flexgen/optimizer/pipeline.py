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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

from flexgen.models.base import ModelArgs
from flexgen.optimizer.cost_model import BlockModel, Estimate, evaluate, fractions_of
from flexgen.optimizer.hardware import HardwareProfile
from flexgen.policy import Policy

@dataclass
class StageEstimate:
    stage: int
    layers: tuple                # (start, stop) in the layer list
    policy: Policy
    prefill_group_s: float       # one group through this stage's layers, prefill
    decode_group_s: float        # one group, one decode step
    memory: dict                 # peak bytes per tier (the KV cache of the whole block)
    estimate: Estimate           # the single-process estimate of one group (bottlenecks, I/O)


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


def estimate_pipeline(args: ModelArgs, policies: Sequence[Policy], prompt_len: int, gen_len: int,
                      hw: HardwareProfile, num_stages: int, link_bw: Optional[float] = None,
                      link_latency: Optional[float] = None) -> PipelineEstimate:
    """Predict a pipeline of `num_stages` stages; policies: one for all, or one per stage.
    The link between stages: link_bw (bytes/s) and link_latency (s), else the profile's."""
    bw = link_bw or hw.link_bw
    lat = hw.link_latency if link_latency is None else link_latency
    N = num_stages
    pols = list(policies) * N if len(policies) == 1 else list(policies)
    p0 = pols[0]
    import torch

    # The engine's own stage split, so that the prediction is of the stages it will run.
    # Imported here: flexgen.pipeline imports the scheduler, and the optimizer package
    # itself must not depend on the engine.
    from flexgen.pipeline import _groups, split_layers
    from flexgen.pipeline import layer_costs as stage_layer_costs
    spans = split_layers(stage_layer_costs(args, getattr(torch, hw.compute_dtype), p0.compress_weight), N)
    groups = _groups(p0.num_gpu_batches, N)
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
                                    est.decode_time / max(1, gen_len - 1), dict(full.memory), est))
    row = args.hidden_size * hw.dtype_bytes * p0.gpu_batch_size * nb_g
    link_pre = lat * (nb_g + 1) + row * prompt_len / bw
    link_dec = lat * (nb_g + 2) + row / bw
    pre = [s.prefill_group_s for s in stages]
    dec = [s.decode_group_s for s in stages]
    prefill = sum(pre) + (N - 1) * link_pre + (G - 1) * max(pre)
    period = max(G * max(dec), sum(dec) + (N * link_dec if N > 1 else 0.0))
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
    lines.append(f"prefill {pe.prefill_time:.3f} s, decode {pe.decode_time:.3f} s "
                 f"({pe.decode_period:.4f} s per step, bubble {100 * pe.bubble:.0f} %)")
    lines.append(f"predicted throughput {pe.throughput:.2f} token/s")
    return "\n".join(lines)
