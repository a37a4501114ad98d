"""Hidden states between layers, one slot per gpu batch, rows split across tiers.

`store` keeps the gpu rows as they are (no copy), copies the cpu rows to host memory and
writes the disk rows to a file; `load` brings them back to the compute device. With
activations wholly on the gpu tier both are free.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexgen.placement import RowSplit
from flexgen.tiers import ComputeDevice, DiskFile, MemoryTracker, Tier


class HiddenSlot:
    def __init__(self, rows: RowSplit, max_bytes_per_row: int, device: ComputeDevice, tracker: MemoryTracker,
                 path: Path):
        self.ranges = rows.ranges()
        self.device, self.tracker = device, tracker
        self.file = DiskFile(path, rows.disk * max_bytes_per_row) if rows.disk else None
        self.parts: list = []
        self.held: list[tuple[Tier, int]] = []
        self.last_store = None   # future of the last store; a load waits for it
        self.resident = len(self.ranges) == 1 and self.ranges[0][0] is Tier.GPU

    def store(self, x: torch.Tensor, after=None) -> None:
        """x (gbs, s, h) on the compute device (I/O thread)."""
        self._release()
        parts = []
        with self.device.io_stream(after):
            for tier, a, b in self.ranges:
                rows = x[a:b]
                if tier is Tier.GPU:
                    parts.append(rows)
                    continue
                host = self.device.host_empty(rows.shape, rows.dtype)
                host.copy_(rows, non_blocking=True)
                parts.append(host)
                self.held.append((tier, host.numel() * host.element_size()))
                self.tracker.add(tier, self.held[-1][1])
        # io_stream synchronised on exit, so the host copies have landed.
        for n, (tier, a, b) in enumerate(self.ranges):
            if tier is Tier.DISK:
                self.file.write(0, parts[n])
                parts[n] = (parts[n].shape, parts[n].dtype)  # the host copy is dropped
        self.parts = parts

    def load(self) -> torch.Tensor:
        """The stored hidden states on the compute device (I/O thread)."""
        if len(self.parts) == 1 and self.ranges[0][0] is Tier.GPU:
            return self.parts[0]
        pieces = []
        with self.device.io_stream():
            for (tier, a, b), part in zip(self.ranges, self.parts):
                if tier is Tier.DISK:
                    shape, dtype = part
                    host = torch.empty(shape, dtype=dtype, pin_memory=self.device.is_cuda)
                    self.file.read(0, host)
                    part = host
                pieces.append(part.to(self.device.device, non_blocking=True))
            out = torch.cat(pieces)
        return out

    def _release(self):
        for tier, n in self.held:
            self.tracker.sub(tier, n)
        self.held = []

    def close(self):
        self._release()
        self.parts = []
        if self.file is not None:
            self.file.unlink()
            self.file = None
