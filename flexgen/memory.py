"""Memory tiers, and the bytes the engine holds in each.

gpu is the memory of the compute device, cpu host memory, disk files in the offload
directory.
"""

from __future__ import annotations

import enum
import threading


class Tier(enum.Enum):
    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


TIERS = (Tier.GPU, Tier.CPU, Tier.DISK)


class MemoryTracker:
    """Bytes held in each tier by the engine's own allocations, with peaks.

    On CUDA the allocator's own peak is reported too; on the CPU the process's peak RSS.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.current = {t: 0 for t in TIERS}
        self.peak = {t: 0 for t in TIERS}

    def add(self, tier: Tier, nbytes: int) -> None:
        with self._lock:
            self.current[tier] += nbytes
            self.peak[tier] = max(self.peak[tier], self.current[tier])

    def sub(self, tier: Tier, nbytes: int) -> None:
        with self._lock:
            self.current[tier] -= nbytes

    def reset_peaks(self) -> None:
        with self._lock:
            self.peak = dict(self.current)

    def report(self) -> dict[str, int]:
        return {t.value: self.peak[t] for t in TIERS}


def process_peak_rss() -> int:
    """Peak resident memory of this process in bytes (Linux ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


__all__ = ["TIERS", "MemoryTracker", "Tier", "process_peak_rss"]
