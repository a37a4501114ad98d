"""Memory budgets per tier and the check of an estimate against them.

Apart from the solver so that `cost_model.estimate` can check budgets without importing
the solver (which imports the cost model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexgen.errors import FlexGenError
from flexgen.memory import TIERS
from flexgen.optimizer.hardware import GIB, HardwareProfile

if TYPE_CHECKING:
    from flexgen.optimizer.cost_model import Estimate

# The optimizer keys its figures (memory, budgets, JSON output) by the tiers' names.
TIER_NAMES = tuple(t.value for t in TIERS)   # "gpu", "cpu", "disk"


@dataclass(frozen=True)
class Budgets:
    """Usable bytes per tier.

    A cpu budget is memory for tensors: the process's own footprint (the profile's
    `cpu_reserved`) comes out of the machine's total once, so a budget is cut only where it
    exceeds what is left. The gpu reserve (CUDA context, allocator slack) lives on the card,
    so it comes out of the gpu budget, which names the card's size."""
    gpu: float
    cpu: float
    disk: float
    combined: float | None = None   # gpu + cpu, when both come out of the same host memory
    given: tuple[float, float, float] = (0.0, 0.0, 0.0)  # what the user asked for, for messages

    @classmethod
    def from_request(cls, hw: HardwareProfile, gpu_mem: float | None = None, cpu_mem: float | None = None,
                     disk_mem: float | None = None) -> "Budgets":
        """Budgets from the user's sizes in bytes (None: the profile's capacity)."""
        g = float(hw.gpu_mem if gpu_mem is None else gpu_mem)
        c = float(hw.cpu_mem if cpu_mem is None else cpu_mem)
        d = float(hw.disk_mem if disk_mem is None else disk_mem)
        for name, v in (("gpu", g), ("cpu", c), ("disk", d)):
            if not math.isfinite(v) or v < 0:
                raise FlexGenError(f"{name} memory budget must be a non-negative number, got {v}")
        host = max(0.0, hw.cpu_mem - hw.cpu_reserved)
        return cls(gpu=max(0.0, g - hw.gpu_reserved), cpu=min(c, host), disk=d,
                   combined=host if hw.unified_memory else None, given=(g, c, d))

    def of(self, tier: str) -> float:
        return getattr(self, tier)

    def to_dict(self) -> dict:
        return {"gpu": self.gpu, "cpu": self.cpu, "disk": self.disk, "combined": self.combined}


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB" if x < 100 * GIB else f"{x / GIB:.0f} GiB"


def _reserve_note(budgets: Budgets, tier: str) -> str:
    i = TIER_NAMES.index(tier)
    given = budgets.given[i]
    usable = budgets.of(tier)
    if given and abs(given - usable) > 1:
        why = ("the CUDA context and allocator slack" if tier == "gpu" else
               "what this machine has once the process itself is counted")
        return f"{_gib(usable)} usable of the {_gib(given)} budget ({why})"
    return f"{_gib(usable)} budget"


def check_budgets(est: Estimate, budgets: Budgets) -> list[str]:
    """Fill `est.budgets` / `est.shortfalls`: one sentence per tier that does not fit."""
    est.budgets = budgets.to_dict()
    out = []
    for tier in TIER_NAMES:
        need = est.memory[tier]
        have = budgets.of(tier)
        if need > have * (1 + 1e-9) + 1:
            phase = max(est.memory_by_phase, key=lambda p: est.memory_by_phase[p][tier])
            parts = sorted(est.memory_breakdown[phase][tier].items(), key=lambda kv: -kv[1])
            top = ", ".join(f"{k} {_gib(v)}" for k, v in parts if v >= 0.05 * need)
            out.append(f"needs {_gib(need)} of {tier} memory in {phase} ({top}); "
                       f"{_reserve_note(budgets, tier)}: {_gib(need - have)} more needed")
    if budgets.combined is not None:
        need = max(m["gpu"] + m["cpu"] for m in est.memory_by_phase.values())
        if need > budgets.combined + 1:
            out.append(f"needs {_gib(need)} of host memory for the gpu and cpu tiers together; "
                       f"{_gib(budgets.combined)} available: {_gib(need - budgets.combined)} more needed")
    est.shortfalls = out
    return out
