"""How a pipeline cuts the work: the layer list into contiguous stages, balanced by bytes
and FLOPs, and a block's gpu batches into the groups that move through the stages
together. Pure functions, shared by the engine's stages (flexgen/pipeline.py) and the
optimizer's plan (flexgen/optimizer/pipeline.py), so that both cut the model alike."""

from __future__ import annotations

from flexgen.errors import FlexGenError


def split_layers(costs: list[float], num_stages: int) -> list[slice]:
    """Contiguous slices of the layer list, one per stage, with costs as even as possible
    (each slice ends where the running total first reaches its share)."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise FlexGenError(f"{num_stages} pipeline stages for {n} layers")
    total = float(sum(costs))
    bounds, acc, start = [], 0.0, 0
    for j, c in enumerate(costs):
        acc += c
        s = len(bounds) + 1   # the stage this slice would close
        left = n - (j + 1)    # layers after j
        if s < num_stages and (acc >= total * s / num_stages or left == num_stages - s) and left >= num_stages - s:
            bounds.append(slice(start, j + 1))
            start = j + 1
    bounds.append(slice(start, n))
    return bounds


def stage_costs(args, dtype, compress: bool) -> list[float]:
    """Each layer's share of the bytes to stream plus its share of the matmul FLOPs, so
    that stages balance whether their time goes to I/O or to compute (the input
    embedding is large but costs no FLOPs; the head costs both)."""
    from flexgen.layout import model_layouts
    layouts = model_layouts(args, dtype, compress)
    nbytes = [float(lay.nbytes) for lay in layouts]
    flops = [0.0 if lay.spec.kind == "input" else float(sum(e.numel for e in lay.spec.entries if len(e.shape) >= 2))
             for lay in layouts]
    tb, tf = sum(nbytes) or 1.0, sum(flops) or 1.0
    return [b / tb + f / tf for b, f in zip(nbytes, flops)]


def micro_batch_groups(ngb: int, count: int) -> list[range]:
    """ngb gpu batches in `count` contiguous groups of nearly equal size."""
    count = max(1, min(count, ngb))
    cuts = [round(ngb * g / count) for g in range(count + 1)]
    return [range(cuts[g], cuts[g + 1]) for g in range(count)]
