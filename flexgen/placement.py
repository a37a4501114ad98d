"""Policy -> where each byte of weights and each row of KV cache / activations lives.

Weights: each layer's bytes (in store order) are split contiguously: the first
`w_gpu_percent` on the gpu tier, the next `w_cpu_percent` in host memory, the rest on
disk. Splitting inside the layer (at 64-byte granularity, not whole tensors) keeps the
achieved split within a fraction of a percent of the request, and every layer gets the
same split, so every layer's load takes the same time and overlaps evenly with compute.

KV cache and activations: each gpu batch's rows (sequences) are split the same way:
the first rows on gpu, the next in host memory, the rest on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexgen.memory import Tier
from flexgen.policy import Policy

GRANULARITY = 64


@dataclass(frozen=True)
class Segments:
    """Byte ranges [start, end) of one layer on each tier: gpu, then cpu, then disk."""
    gpu_end: int
    cpu_end: int
    total: int

    def bytes_on(self, tier: Tier) -> int:
        return {Tier.GPU: self.gpu_end, Tier.CPU: self.cpu_end - self.gpu_end,
                Tier.DISK: self.total - self.cpu_end}[tier]


def split_bytes(total: int, gpu_percent: float, cpu_percent: float, granularity: int = GRANULARITY) -> Segments:
    def cut(pct):
        return min(total, round(total * pct / 100 / granularity) * granularity)
    g = cut(gpu_percent)
    c = max(g, cut(gpu_percent + cpu_percent))
    return Segments(g, c, total)


@dataclass(frozen=True)
class RowSplit:
    """Rows of one gpu batch on each tier, in row order gpu, cpu, disk."""
    gpu: int
    cpu: int
    disk: int

    def ranges(self):
        """(tier, start, stop) for each non-empty tier."""
        out, start = [], 0
        for tier, n in ((Tier.GPU, self.gpu), (Tier.CPU, self.cpu), (Tier.DISK, self.disk)):
            if n:
                out.append((tier, start, start + n))
            start += n
        return out


def split_rows(rows: int, gpu_percent: float, cpu_percent: float) -> RowSplit:
    g = round(rows * gpu_percent / 100)
    c = round(rows * (gpu_percent + cpu_percent) / 100) - g
    return RowSplit(g, c, rows - g - c)


@dataclass(frozen=True)
class Placement:
    weights: tuple[Segments, ...]   # per streamed layer
    cache: RowSplit                 # per gpu batch
    act: RowSplit                   # per gpu batch

    def weight_bytes(self) -> dict[str, int]:
        return {t.value: sum(s.bytes_on(t) for s in self.weights) for t in (Tier.GPU, Tier.CPU, Tier.DISK)}

    def achieved(self) -> dict[str, list[float]]:
        """The achieved percents (gpu, cpu, disk) of weights, cache rows and activation rows."""
        wb = self.weight_bytes()
        total = max(1, sum(wb.values()))

        def rows(r: RowSplit):
            n = r.gpu + r.cpu + r.disk
            return [100 * r.gpu / n, 100 * r.cpu / n, 100 * r.disk / n]
        return {"weights": [100 * wb[t] / total for t in ("gpu", "cpu", "disk")],
                "cache": rows(self.cache), "act": rows(self.act)}


def plan(layer_nbytes: list[int], policy: Policy) -> Placement:
    return Placement(
        weights=tuple(split_bytes(n, policy.w_gpu_percent, policy.w_cpu_percent) for n in layer_nbytes),
        cache=split_rows(policy.gpu_batch_size, policy.cache_gpu_percent, policy.cache_cpu_percent),
        act=split_rows(policy.gpu_batch_size, policy.act_gpu_percent, policy.act_cpu_percent),
    )
