"""Weights resident on their tiers, and the loader that brings one layer to the compute device.

Each layer's bytes are laid out as in the weight store (layout.LayerLayout) and split
by placement.Segments: [0, gpu_end) lives in compute-device memory, [gpu_end, cpu_end)
in host memory, the rest is read from a disk file. Loading a layer that is not wholly
on the gpu tier assembles its bytes in one of two working buffers on the compute device
(current layer and prefetched next layer); tensors wholly inside the gpu part are views
of the resident bytes and are never copied.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from flexgen.device import ComputeDevice
from flexgen.diskio import ALIGN, DiskFile, ReadPriority, aligned_empty
from flexgen.layout import LayerLayout
from flexgen.memory import MemoryTracker, Tier
from flexgen.models.base import build_weights
from flexgen.placement import Segments
from flexgen.weightstore import WeightStore, dummy_layer_bytes


class ReadOrder:
    """Turns for disk reads in the order their loads were issued, one read at a time.

    Two weight threads with a plain lock raced for it: on a loaded host the load issued
    second sometimes read first (layer 2 before layer 1, which compute needed first). A
    turn is taken when a load is issued; a read waits until its turn is the oldest one
    still held; a turn is given back after its read, or by whoever learns that its load
    ended without reading (failed, cancelled), so no read waits on it forever.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._next = 0
        self._held: set[int] = set()

    def take(self) -> int:
        with self._cond:
            turn, self._next = self._next, self._next + 1
            self._held.add(turn)
            return turn

    def release(self, turn: int) -> None:
        with self._cond:
            self._held.discard(turn)
            self._cond.notify_all()

    @contextmanager
    def turn(self, turn: int):
        with self._cond:
            while min(self._held) != turn:
                self._cond.wait()
        try:
            yield
        finally:
            self.release(turn)


@dataclass
class LoadedLayer:
    """A layer's stored arrays on the compute device, keyed by (field, part)."""
    idx: int
    arrays: dict[tuple[str, str], torch.Tensor]
    built: object = None       # the weight dataclass, when the loader already made it


class PlacedWeights:
    def __init__(self, layouts: list[LayerLayout], segments: tuple[Segments, ...], device: ComputeDevice,
                 dtype: torch.dtype, tracker: MemoryTracker, *, store: Optional[WeightStore] = None,
                 dummy=None, run_dir: Optional[Path] = None, pin: bool = True, progress=None,
                 read_priority: Optional[ReadPriority] = None):
        self.layouts, self.segments, self.device, self.dtype = layouts, segments, device, dtype
        self.tracker = tracker
        self.read_priority = read_priority   # weight reads yield to urgent ones between pieces
        self.gpu_parts: list[Optional[torch.Tensor]] = []
        self.cpu_parts: list[Optional[torch.Tensor]] = []
        self.disk_files: list[Optional[DiskFile]] = []
        self._own_files: list[DiskFile] = []
        self.store = store
        self._unchecked: dict[int, dict[int, int]] = {}  # layer -> running CRCs, until its disk part is read
        for idx, (lay, seg) in enumerate(zip(layouts, segments)):
            if store is not None:
                self._place_from_store(store, idx, lay, seg, pin)
            else:
                self._place_dummy(dummy, run_dir, idx, lay, seg, pin)
            if progress is not None:
                progress.update(1)
        # Two working buffers (current + prefetched layer), sized for the largest layer
        # that is not wholly resident on the gpu tier. Allocated once and reused.
        # Allocated here, on the compute thread: an I/O thread allocating them lazily would
        # take them from the compute stream's pool, maybe a block compute still reads.
        partial = [lay.file_bytes for lay, seg in zip(layouts, segments) if seg.gpu_end < seg.total]
        self.slot_bytes = max(partial, default=0)
        self._slots: list[Optional[torch.Tensor]] = [None, None]
        if self.slot_bytes:
            self._slots = [self._new_slot() for _ in range(2)]
        # On CUDA, disk bytes pass through a page-locked staging buffer per slot; the next
        # disk read into it waits for the device copy that last read it (its event).
        disk = any(seg.cpu_end < seg.total for seg in segments)
        self._staging: list[Optional[torch.Tensor]] = [None, None]
        self._staging_done = [None, None]
        if disk and device.is_cuda:
            self._staging = [device.host_bytes(self.slot_bytes, pin=True) for _ in range(2)]
            self.tracker.add(Tier.CPU, 2 * self.slot_bytes)
        self._resident_cache: dict[int, object] = {}       # idx -> weight dataclass
        self._resident_loaded: dict[int, LoadedLayer] = {}
        # Dequantized weights: one buffer per (layer kind, field), reused layer after layer
        # (fresh buffers cost page faults). The loader dequantizes the next layer on an I/O
        # thread while this one computes: neighbours differ in kind (attention, mlp), so
        # they never share a buffer; a kind that follows itself gets one per working slot.
        kinds = [lay.spec.kind for lay in layouts]
        self._repeats = {kinds[i] for i in range(len(kinds)) if kinds[i] == kinds[i - 1]}
        self._dequant_out: dict[tuple, torch.Tensor] = {}
        # One layer's disk read at a time, in the order issued. The next layer's load is
        # issued while this one's may still be reading; sharing the disk between them
        # delays the layer compute needs first and, on a 2-core host with a virtual disk,
        # left the disk idle while compute ran (OPT-1.3B, 80 % of weights on disk, 9
        # alternating pairs: decode median 11.7 s with one read at a time, 13.9 s with
        # two; one at a time faster in 7 pairs).
        self._reads = ReadOrder()

    def resident(self, idx: int) -> bool:
        """Wholly on the gpu tier and stored uncompressed: loading it costs nothing."""
        seg = self.segments[idx]
        return seg.gpu_end == seg.total and not self.layouts[idx].compressed

    # -- placement --------------------------------------------------------------------

    def _keep(self, flat_part: torch.Tensor, seg: Segments, pin: bool):
        gpu = None
        if seg.gpu_end == flat_part.numel() and not self.device.is_cuda:
            gpu = flat_part   # the whole buffer, already on the (CPU) compute device: no copy
        elif seg.gpu_end:
            gpu = flat_part[:seg.gpu_end].to(self.device.device, copy=True)
        cpu = None
        if seg.cpu_end > seg.gpu_end:
            cpu = self.device.host_empty((seg.cpu_end - seg.gpu_end,), torch.uint8, pin=pin)
            cpu.copy_(flat_part[seg.gpu_end:seg.cpu_end])
        self.gpu_parts.append(gpu)
        self.cpu_parts.append(cpu)
        self.tracker.add(Tier.GPU, seg.bytes_on(Tier.GPU))
        self.tracker.add(Tier.CPU, seg.bytes_on(Tier.CPU))
        self.tracker.add(Tier.DISK, seg.bytes_on(Tier.DISK))

    def _place_from_store(self, store: WeightStore, idx: int, lay: LayerLayout, seg: Segments, pin: bool):
        f = DiskFile(store.layer_path(idx), lay.file_bytes, create=False)
        head = torch.empty(seg.cpu_end, dtype=torch.uint8)
        f.read(0, head)  # only what stays in memory; the disk part is read on use
        carry = store.check_range(idx, head, 0, {})
        self._keep(head, seg, pin)
        self.disk_files.append(f if seg.cpu_end < seg.total else None)
        if seg.cpu_end == seg.total:
            f.close()
        else:
            self._unchecked[idx] = carry

    def _place_dummy(self, source, run_dir: Path, idx: int, lay: LayerLayout, seg: Segments, pin: bool):
        flat = dummy_layer_bytes(source, lay)
        self._keep(flat, seg, pin)
        if seg.cpu_end < seg.total:
            # A sparse file with the store's offsets; only the disk part is written.
            f = DiskFile(run_dir / f"dummy_layer_{idx:04d}.bin", lay.nbytes)
            f.write(seg.cpu_end, flat[seg.cpu_end:])
            self._own_files.append(f)
            self.disk_files.append(f)
        else:
            self.disk_files.append(None)

    # -- loading ----------------------------------------------------------------------

    def disk_bytes(self) -> tuple[int, int]:
        """(read, written) bytes through this model's weight files so far."""
        files = [f for f in self.disk_files if f is not None]
        return sum(f.bytes_read for f in files), sum(f.bytes_written for f in files)

    @property
    def direct_io(self) -> Optional[bool]:
        files = [f for f in self.disk_files if f is not None]
        return all(f.direct for f in files) if files else None

    def _new_slot(self) -> torch.Tensor:
        self.tracker.add(Tier.GPU, self.slot_bytes)
        if self.device.device.type == "cuda":
            return self.device.empty((self.slot_bytes,), torch.uint8)
        return aligned_empty(self.slot_bytes)   # host memory: aligned so disk reads land in it directly

    def read_turn(self, idx: int) -> Optional[int]:
        """Layer `idx`'s place in the disk read order, taken when its load is issued (None:
        it reads nothing from disk). Pass it to `load`, and `release_turn` it once the load
        is done, failed or cancelled."""
        seg = self.segments[idx]
        return self._reads.take() if seg.cpu_end < seg.total else None

    def release_turn(self, turn: Optional[int]) -> None:
        if turn is not None:
            self._reads.release(turn)

    def load(self, idx: int, slot: int, turn: Optional[int] = None) -> LoadedLayer:
        """Bring layer `idx` to the compute device, dequantized (runs on an I/O thread).
        `turn`: from `read_turn` (without one the disk read takes its place when it starts).

        On CUDA it runs on the I/O thread's side stream, which first waits for the mark
        after which the slot is free to overwrite (ComputeDevice.io_task).
        """
        loaded = self._load_bytes(idx, slot, turn)
        if not self.layouts[idx].compressed:
            return loaded
        return LoadedLayer(idx, loaded.arrays, self._build(loaded, slot))

    def _load_bytes(self, idx: int, slot: int, turn: Optional[int]) -> LoadedLayer:
        lay, seg = self.layouts[idx], self.segments[idx]
        gpu = self.gpu_parts[idx]
        if seg.gpu_end == seg.total:
            if idx not in self._resident_loaded:
                self._resident_loaded[idx] = LoadedLayer(idx, {(a.field, a.part): _view(gpu, a) for a in lay.arrays})
            return self._resident_loaded[idx]
        flat = self._slots[slot]
        if seg.cpu_end < seg.total:
            start = seg.cpu_end // ALIGN * ALIGN
            if self.device.is_cuda:
                if self._staging_done[slot] is not None:
                    self._staging_done[slot].synchronize()   # the copy two layers ago, long done
                staging = self._staging[slot][: lay.file_bytes - start]
                self._read_disk_part(idx, start, staging, turn)
                flat[seg.cpu_end:seg.total].copy_(staging[seg.cpu_end - start: seg.total - start],
                                                  non_blocking=True)
                self._staging_done[slot] = torch.cuda.Event()
                self._staging_done[slot].record(torch.cuda.current_stream(self.device.device))
            else:
                self._read_disk_part(idx, start, flat[start:lay.file_bytes], turn)
        # After the disk read: its aligned start may have covered the cpu part's tail.
        if seg.cpu_end > seg.gpu_end:
            flat[seg.gpu_end:seg.cpu_end].copy_(self.cpu_parts[idx], non_blocking=True)
        straddle = min((a.offset for a in lay.arrays if a.offset < seg.gpu_end < a.end), default=None)
        if straddle is not None:
            flat[straddle:seg.gpu_end].copy_(gpu[straddle:seg.gpu_end], non_blocking=True)
        arrays = {(a.field, a.part): _view(gpu if a.end <= seg.gpu_end else flat, a) for a in lay.arrays}
        return LoadedLayer(idx, arrays)

    def _read_disk_part(self, idx: int, start: int, host: torch.Tensor, turn: Optional[int]) -> None:
        """Read layer `idx`'s bytes from `start` into `host`, one layer's read at a time."""
        with self._reads.turn(self._reads.take() if turn is None else turn):
            self.disk_files[idx].read(start, host, yield_to=self.read_priority)
        self._check_once(idx, host, start)

    def _check_once(self, idx: int, host: torch.Tensor, start: int) -> None:
        """Checksums of the arrays in a layer's disk part, the first time they are read."""
        carry = self._unchecked.pop(idx, None)
        if carry is not None:
            cpu_end = self.segments[idx].cpu_end  # bytes before it were checked at placement
            self.store.check_range(idx, host[cpu_end - start:self.layouts[idx].nbytes - start], cpu_end, carry)

    def weights(self, loaded: LoadedLayer):
        """The layer's weight dataclass (built by the loader, or here from plain arrays)."""
        if loaded.built is not None:
            return loaded.built
        if loaded.idx in self._resident_cache:
            return self._resident_cache[loaded.idx]
        w = self._build(loaded, 0)
        if self.resident(loaded.idx):
            self._resident_cache[loaded.idx] = w   # views of resident bytes: build once
        return w

    def _build(self, loaded: LoadedLayer, slot: int):
        lay = self.layouts[loaded.idx]
        tensors = {}
        for e in lay.spec.entries:
            if (e.field, "") in loaded.arrays:
                tensors[e.field] = loaded.arrays[(e.field, "")]
            else:
                from flexgen.quant import WEIGHT_QUANT, Packed, dequantize
                a = loaded.arrays
                packed = Packed(data=a[(e.field, "data")], scale=a[(e.field, "scale")], mn=a[(e.field, "mn")],
                                shape=e.shape, cfg=WEIGHT_QUANT)
                key = (lay.spec.kind, e.field) + ((slot,) if lay.spec.kind in self._repeats else ())
                out = self._dequant_out.get(key)
                if out is None or tuple(out.shape) != e.shape:
                    out = self._dequant_out[key] = self.device.empty(e.shape, self.dtype)
                    self.tracker.add(Tier.GPU, out.numel() * out.element_size())
                tensors[e.field] = dequantize(packed, self.dtype, out=out)
        return build_weights(lay.spec, tensors)

    def close(self):
        for f in self.disk_files:
            if f is not None and f not in self._own_files:
                f.close()
        for f in self._own_files:
            f.unlink()
        self._own_files.clear()
        self.disk_files = []
        self.gpu_parts, self.cpu_parts, self._slots, self._staging = [], [], [None, None], [None, None]
        self._staging_done = [None, None]
        self._resident_cache.clear()
        self._resident_loaded.clear()
        self._dequant_out.clear()


def _view(flat: torch.Tensor, a) -> torch.Tensor:
    return flat[a.offset:a.end].view(a.dtype).view(a.shape)
