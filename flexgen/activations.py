"""Hidden states between layers, one slot per gpu batch, rows split across tiers.

`store` keeps the gpu rows as they are (no copy), copies the cpu rows to host memory and
writes the disk rows to a file; `load` brings them back to the compute device. With
activations wholly on the gpu tier both are free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from flexgen.device import ComputeDevice
from flexgen.diskio import DiskFile, ReadPriority, urgent
from flexgen.memory import MemoryTracker, Tier
from flexgen.placement import RowSplit


class HiddenSlot:
    def __init__(self, rows: RowSplit, max_bytes_per_row: int, device: ComputeDevice, tracker: MemoryTracker,
                 path: Path, read_priority: Optional[ReadPriority] = None):
        self.ranges = rows.ranges()
        self.read_priority = read_priority   # compute needs a load next: it goes ahead of weight reads
        self.device, self.tracker = device, tracker
        self.file = DiskFile(path, rows.disk * max_bytes_per_row) if rows.disk else None
        self.parts: list = []
        self.held: list[tuple[Tier, int]] = []
        self.last_store = None   # future of the last store; a load waits for it
        self.resident = len(self.ranges) == 1 and self.ranges[0][0] is Tier.GPU
        # One host buffer per non-gpu range, sized for the prompt and reused by every store:
        # page-locked on CUDA (copied to the device every layer; disk rows pass through it).
        # Reuse is safe: a store waits for compute, which waited for the last load's copy,
        # and the next load waits for the store.
        # Tracked: the host buffers on the cpu tier, the disk rows' file on the disk tier.
        self._host = {}
        for tier, a, b in self.ranges:
            if tier is not Tier.GPU:
                n = (b - a) * max_bytes_per_row
                self._host[a] = device.host_bytes(n, pin=True)
                self.held.append((Tier.CPU, n))
                if tier is Tier.DISK:
                    self.held.append((Tier.DISK, n))
        for tier, n in self.held:
            tracker.add(tier, n)

    def _host_view(self, a: int, shape, dtype) -> torch.Tensor:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        return self._host[a][:n].view(dtype).view(shape)

    def store(self, x: torch.Tensor) -> None:
        """x (gbs, s, h) on the compute device (I/O thread, on its side stream)."""
        parts = []
        for tier, a, b in self.ranges:
            rows = x[a:b]
            if tier is Tier.GPU:
                parts.append(rows)
                continue
            host = self._host_view(a, rows.shape, rows.dtype)
            host.copy_(rows, non_blocking=True)
            parts.append(host)
        if self.file is not None:
            self.device.sync_stream()   # the disk write reads the host copy
        for n, (tier, a, b) in enumerate(self.ranges):
            if tier is Tier.DISK:
                self.file.write(0, parts[n])
                parts[n] = (parts[n].shape, parts[n].dtype)  # the host bytes are reused
        self.parts = parts

    def load(self) -> torch.Tensor:
        """The stored hidden states on the compute device (I/O thread, on its side stream)."""
        if len(self.parts) == 1 and self.ranges[0][0] is Tier.GPU:
            return self.parts[0]
        pieces = []
        for (tier, a, b), part in zip(self.ranges, self.parts):
            if tier is Tier.DISK:
                shape, dtype = part
                part = self._host_view(a, shape, dtype)
                with urgent(self.read_priority):
                    self.file.read(0, part)
            pieces.append(part.to(self.device.device, non_blocking=True))
        return self.device.hand_off(torch.cat(pieces))

    def close(self):
        for tier, n in self.held:
            self.tracker.sub(tier, n)
        self.held = []
        self.parts = []
        self._host = {}
        if self.file is not None:
            self.file.unlink()
            self.file = None
