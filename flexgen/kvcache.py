"""The KV cache: an explicit object, created by the engine for one block and passed to layers.

For every attention layer and gpu batch there is a `KVSlot`. Its rows (sequences) are
split across tiers by placement.RowSplit; each part keeps K and V time-major, (T, rows,
h), so reading the first t positions and appending one position are contiguous on every
tier, disk included. With `compress_cache` each part holds 4-bit packed arrays with the
same leading (T, rows) dims, so appending a token quantizes only that token.

A decode step goes: `begin` (I/O thread) assembles working K/V with room for the new
token, on the compute device, or on the host for rows whose cache is not on the gpu
tier when `cpu_cache_compute` is on; a 4-bit cache whose rows attend on the host (a CPU
compute device, or host attention) stays packed there. The layer calls `update`
(compute thread), which writes the new k/v and returns what each row group attends
over (packed rows: `PackedAttention`, a tile of rows at a time); `end` (I/O thread)
writes the new positions back to their tiers. Every slot has its own working buffers,
so any number of gpu batches can be in flight.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from flexgen.device import ComputeDevice, PinnedStaging
from flexgen.diskio import DiskFile, ReadPriority, align_up, aligned_empty, aligned_host_empty, urgent
from flexgen.memory import MemoryTracker, Tier
from flexgen.models.base import AttendGroup
from flexgen.placement import RowSplit


class PlainArray:
    """A time-major (T, rows, *trailing) array on one tier.

    A host-tier array is never page-locked: the host KV cache can be most of host memory
    (OPT-30B, 4-bit cache on the host: 160 GiB of a 208 GB machine), and page-locked
    memory that large is refused or starves the host. Its copies to the device go
    through the driver's own staging. `staging`: where disk reads bound for the device
    pass through (small, reused, page-locked)."""

    def __init__(self, tier: Tier, shape: tuple, dtype: torch.dtype, device: ComputeDevice,
                 disk: Optional[tuple[DiskFile, int]] = None, staging: Optional[PinnedStaging] = None):
        self.tier, self.shape, self.dtype, self.device = tier, tuple(shape), dtype, device
        self.staging = staging
        self.row_bytes = int(torch.Size(shape[1:]).numel()) * torch.empty((), dtype=dtype).element_size()
        self.nbytes = self.row_bytes * shape[0]
        self.data = None
        if tier is Tier.GPU:
            self.data = device.empty(shape, dtype)
        elif tier is Tier.CPU:
            self.data = device.host_empty(shape, dtype)
        else:
            self.file, self.base = disk

    def view(self, t1: int) -> torch.Tensor:
        return self.data[:t1]

    def read(self, t0: int, t1: int, out: torch.Tensor, scratch_after: bool = False, host: bool = True) -> None:
        """Copy positions [t0, t1) into `out` (may be strided); `host`: out is in host memory.

        `scratch_after`: out's storage after it may be overwritten (see DiskFile.read)."""
        if t1 <= t0:
            return
        if self.data is not None:
            out.copy_(self.data[t0:t1], non_blocking=True)
            return
        if (host or not self.device.is_cuda) and out.is_contiguous():
            # Straight into the destination: O_DIRECT when it is page-aligned (see _buffer).
            self.file.read(self.base + t0 * self.row_bytes, out, scratch_after)
            return
        shape = (t1 - t0, *self.shape[1:])
        nbytes = _nbytes(shape, self.dtype)
        buf = self.staging.take(nbytes)
        try:
            stage = buf[:nbytes].view(self.dtype).view(shape)
            self.file.read(self.base + t0 * self.row_bytes, stage, scratch_after=True)
            out.copy_(stage, non_blocking=True)
        finally:
            self.staging.give(buf)

    def write(self, t0: int, x: torch.Tensor) -> None:
        """Store x (s, rows, ...) at positions [t0, t0+s)."""
        if self.data is not None:
            self.data[t0:t0 + x.shape[0]].copy_(x, non_blocking=True)
            return
        self.file.write(self.base + t0 * self.row_bytes, x.to("cpu").contiguous())


QUANT_CHUNK_ELEMS = 1 << 22   # values quantized per step when storing a prefill's K/V


def kv_array_specs(shape: tuple, dtype: torch.dtype, compress: bool) -> dict[str, tuple[tuple, torch.dtype]]:
    """The plain arrays (name -> (shape, dtype)) that hold one K or V of `shape`."""
    if compress:
        from flexgen.quant import CACHE_QUANT, packed_shapes
        return {k: (tuple(v[0]), v[1]) for k, v in packed_shapes(shape, CACHE_QUANT).items()}
    return {"": (tuple(shape), dtype)}


def _buffer(shape, dtype: torch.dtype, device: ComputeDevice, host: bool) -> torch.Tensor:
    """A working buffer; in host memory page-aligned and padded to a whole page, so that a
    disk read lands in it directly with one operation (DiskFile.read's scratch_after).

    On the device it is allocated on the calling I/O thread's side stream, never from the
    compute stream's pool, where a block compute has just freed may still be in use."""
    if host or device.device.type == "cpu":
        return aligned_host_empty(shape, dtype)
    return device.empty(shape, dtype)


def _stays_packed(p: "_Part", device: torch.device) -> bool:
    """Whether a part's rows attend over its 4-bit cache still packed (on the host)."""
    return p.k.compress and device.type == "cpu"


def _nbytes(shape, dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


class HostBuffers:
    """The page-aligned host working buffers of one KV cache, kept from step to step.

    A fresh large host buffer costs more in page faults than the read into it: the C
    allocator maps each one anew and unmaps it when freed (measured here: about 1.7 us
    per 4 KiB page, 2.4 GB/s, against 0.7 ms to convert the same 16 MiB once mapped).
    So a work's buffers come back here when it is discarded and are handed out again.
    Each is sized for `capacity` positions (the longest sequence), so one fits every
    step; as many are kept as were ever in flight at once (a few, set by the schedule).
    The tracker counts every buffer held, in use or not, on the tier it stands for.
    """

    def __init__(self, tracker: MemoryTracker):
        self.tracker = tracker
        self._free: dict[tuple[Tier, int], list[torch.Tensor]] = {}
        self._held: dict[Tier, int] = {}
        self._lock = threading.Lock()

    def take(self, work: "KVWork", shape, capacity: int, dtype: torch.dtype, tier: Tier) -> torch.Tensor:
        """A buffer viewed as `shape` (whose first dim is at most `capacity`), returned
        by `give(work)`."""
        cap = align_up(_nbytes((capacity, *shape[1:]), dtype))
        with self._lock:
            free = self._free.get((tier, cap))
            raw = free.pop() if free else None
        if raw is None:
            raw = aligned_empty(cap)
            self.tracker.add(tier, cap)
            with self._lock:
                self._held[tier] = self._held.get(tier, 0) + cap
        work.pooled.append((tier, cap, raw))
        return raw[:_nbytes(shape, dtype)].view(dtype).view(shape)

    def give(self, work: "KVWork") -> None:
        with self._lock:
            for tier, cap, raw in work.pooled:
                self._free.setdefault((tier, cap), []).append(raw)
        work.pooled.clear()

    def close(self) -> None:
        for tier, n in self._held.items():
            self.tracker.sub(tier, n)
        self._held.clear()
        self._free.clear()


class KVArray:
    """K or V of one part: plain, or 4-bit packed as three plain arrays (data, scale, mn)."""

    def __init__(self, tier: Tier, max_len: int, rows: int, hidden: int, dtype: torch.dtype,
                 device: ComputeDevice, compress: bool, disk_alloc=None, staging=None):
        self.dtype, self.compress, self.hidden, self.device = dtype, compress, hidden, device
        self.shape = (max_len, rows, hidden)
        self.parts = {}
        for name, (shape, dt) in kv_array_specs(self.shape, dtype, compress).items():
            disk = disk_alloc(_nbytes(shape, dt)) if tier is Tier.DISK else None
            self.parts[name] = PlainArray(tier, tuple(shape), dt, device, disk, staging)
        self.nbytes = sum(p.nbytes for p in self.parts.values())

    def view(self, t1: int) -> Optional[torch.Tensor]:
        """A live view of positions [0, t1) when no conversion is needed."""
        return None if self.compress else self.parts[""].view(t1)

    def read(self, t1: int, out: torch.Tensor, scratch_after: bool = False, host: bool = True,
             take=None) -> None:
        """Positions [0, t1) into out (t1, rows, h), dequantized; `host`: out is in host
        memory. `scratch_after`: out is the head of a working buffer whose remaining
        positions are not yet filled. `take`: as read_packed."""
        if not self.compress:
            self.parts[""].read(0, t1, out, scratch_after, host)
            return
        from flexgen.quant import dequantize
        dequantize(self.read_packed(t1, host, take), out.dtype, out=out)   # straight into the working buffer

    def packed_view(self, t1: int):
        """Positions [0, t1) of a compressed array held in memory, still packed, as live
        views of its storage (no copy): for dequantizing on the device that holds it."""
        return self._packed(t1, {name: p.view(t1) for name, p in self.parts.items()})

    def read_packed(self, t1: int, host: bool = True, take=None):
        """Positions [0, t1) of a compressed array, still packed (a quant.Packed).
        `take(shape, capacity, dtype)`: where the buffers come from (default: fresh)."""
        arrays = {}
        for name, p in self.parts.items():
            shape = (t1, *p.shape[1:])
            buf = take(shape, p.shape[0], p.dtype) if take else _buffer(shape, p.dtype, self.device, host)
            p.read(0, t1, buf, scratch_after=True, host=host)   # _buffer pads to a whole page
            arrays[name] = buf
        return self._packed(t1, arrays)

    def _packed(self, t1: int, arrays: dict):
        from flexgen.quant import CACHE_QUANT, Packed
        return Packed(data=arrays["data"], scale=arrays["scale"], mn=arrays["mn"],
                      shape=(t1, *self.shape[1:]), cfg=CACHE_QUANT)

    def write(self, t0: int, x: torch.Tensor) -> None:
        if not self.compress:
            self.parts[""].write(t0, x)
            return
        from flexgen.quant import CACHE_QUANT, quantize
        # Only the new positions: the cache is never re-quantized. A prefill's K/V is
        # quantized a few positions at a time (groups run along the hidden dimension),
        # so its fp32 temporaries stay small.
        step = max(1, QUANT_CHUNK_ELEMS // max(1, x[0].numel()))
        for t in range(0, x.shape[0], step):
            p = quantize(x[t:t + step], CACHE_QUANT)
            for name, arr in (("data", p.data), ("scale", p.scale), ("mn", p.mn)):
                self.parts[name].write(t0 + t, arr)


@dataclass
class _Part:
    tier: Tier
    start: int
    stop: int
    k: KVArray
    v: KVArray


@dataclass
class _Group:
    rows: slice
    device: torch.device
    parts: list
    k: torch.Tensor = None          # (t + s, n, h) working buffer or a live view
    v: torch.Tensor = None
    live: bool = False              # k/v are views of the part's own storage
    host: bool = False              # these rows attend on the host (cpu_cache_compute)
    packed: tuple = None            # (K, V) of positions [0, t), still packed: no k/v buffers
    tier: Tier = Tier.GPU           # the tier its working memory counts against


@dataclass
class KVWork:
    """One (layer, gpu batch) in flight; the model's `KVAccess`."""
    slot: "KVSlot"
    t: int                            # positions already cached
    groups: list = field(default_factory=list)
    new_k: torch.Tensor = None        # this step's k/v, time-major (s, b, h), kept for `end`
    new_v: torch.Tensor = None
    tracked: list = field(default_factory=list)   # (tier, bytes) of working buffers on the device
    pooled: list = field(default_factory=list)    # (tier, capacity, buffer) taken from HostBuffers

    def update(self, k: torch.Tensor, v: torch.Tensor):
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)   # (s, b, h)
        s = kt.shape[0]
        if self.t == 0:
            # Prefill: attend over this step's own keys; they are stored by `end`.
            self.new_k, self.new_v = kt, vt
            return [AttendGroup(slice(None), kt, vt)]
        out = []
        host = self.slot.host_attention
        for g in self.groups:
            if host is not None and g.host:
                out.append(AttendGroup(g.rows, g.k, g.v, host.prepare(g, self.t, kt[:, g.rows], vt[:, g.rows])))
                continue
            if g.packed is not None:   # packed in host memory, attended there (a CPU compute device)
                out.append(AttendGroup(g.rows, None, None,
                                       self.slot.packed_attention.bind(g, kt[:, g.rows], vt[:, g.rows])))
                continue
            g.k[self.t:self.t + s].copy_(kt[:, g.rows])
            g.v[self.t:self.t + s].copy_(vt[:, g.rows])
            out.append(AttendGroup(g.rows, g.k, g.v))
        self.new_k, self.new_v = kt, vt
        return out


# Host attention runs in fp32: a CPU has no fast fp16 kernels (1.2-2x slower than fp32
# here), and the hardware profile measures host attention in fp32.
HOST_ATTN_DTYPE = torch.float32

# K values (and as many V values) dequantized per tile by PackedAttention. Measured on this
# project's 2-core host (OPT-13B width, 128 rows over 48 positions and 32 rows over 300):
# 2^22 ran 1.75-1.9x faster than dequantizing the whole group into bf16 and attending
# over it; 2^18-2^21 and 2^23 were 10-50 % slower than 2^22.
PACKED_TILE_ELEMS = 1 << 22


def packed_tile_rows(t: int, rows: int, hidden: int) -> int:
    """Rows per PackedAttention tile over t positions (new ones included)."""
    return min(rows, max(1, PACKED_TILE_ELEMS // (t * hidden)))


def packed_workspace_numel(max_len: int, rows: int, hidden: int) -> int:
    """fp32 values of PackedAttention's workspace for groups of up to `rows` rows (a gpu
    batch): room for a K and a V tile at any length up to `max_len` positions (a tile is
    at most PACKED_TILE_ELEMS values, or one row when a row is more)."""
    return 2 * max(min(max_len * rows * hidden, PACKED_TILE_ELEMS), max_len * hidden)


class PackedAttention:
    """Attention over rows whose 4-bit cache is in host memory and who attend there (a
    CPU compute device, or host attention on CUDA), a tile of rows at a time.

    Each tile's K and V are dequantized in fp32 (HOST_ATTN_DTYPE) into one workspace, the
    new positions appended, and attended at once: the packed cache is read once and no
    working copy of the whole group is ever written in the compute dtype. On a 2-core host
    a bf16 copy cost a rounding pass, and bf16 attention on the CPU ran at half the speed
    of fp32 (decode, one query per row). The workspace (one per tier, sized for the longest
    sequence) is reused by every tile, layer and step, on the compute thread only.
    """

    def __init__(self, tracker: MemoryTracker, max_len: int, rows: int, hidden: int):
        self.tracker = tracker
        self.numel = packed_workspace_numel(max_len, rows, hidden)
        self._ws: dict[Tier, torch.Tensor] = {}

    def _workspace(self, tier: Tier) -> torch.Tensor:
        ws = self._ws.get(tier)
        if ws is None:
            ws = self._ws[tier] = aligned_host_empty((self.numel,), HOST_ATTN_DTYPE)
            self.tracker.add(tier, self.numel * ws.element_size())
        return ws

    def bind(self, g: "_Group", new_k: torch.Tensor, new_v: torch.Tensor):
        """The group's `AttendGroup.attend`, its new k/v (s, r, h) already on the host."""
        packed, g.packed = g.packed, None

        def attend(q: torch.Tensor, mask: Optional[torch.Tensor], fn) -> torch.Tensor:
            return self.attend(g.tier, q, packed, new_k, new_v, mask, fn)
        return attend

    def attend(self, tier: Tier, q: torch.Tensor, packed: tuple, new_k: torch.Tensor, new_v: torch.Tensor,
               mask: Optional[torch.Tensor], fn) -> torch.Tensor:
        """fn(q, keys, values, mask) over positions [0, t + s) of every row, a tile of rows
        at a time; q (r, s, hq) and mask (r, s, t + s) on the host; packed: (K, V), Packed
        of (t, r, h); new_k/new_v (s, r, h). Returns (r, s, hq) in q's dtype."""
        from flexgen.quant import dequantize
        pk, pv = packed
        t, r, h = pk.shape
        total = t + new_k.shape[0]
        n = packed_tile_rows(total, r, h)
        ws = self._workspace(tier)
        out = torch.empty(q.shape, dtype=q.dtype)
        for r0 in range(0, r, n):
            m = min(n, r - r0)
            kv = ws[:2 * total * m * h].view(2, total, m, h)
            for dst, p, new in ((kv[0], pk, new_k), (kv[1], pv, new_v)):
                dequantize(p.narrow(1, r0, m), out=dst[:t])
                dst[t:].copy_(new[:, r0:r0 + m])
            out[r0:r0 + m] = fn(q[r0:r0 + m].to(HOST_ATTN_DTYPE), kv[0], kv[1],
                                None if mask is None else mask[r0:r0 + m])
        return out

    def close(self) -> None:
        for tier, ws in self._ws.items():
            self.tracker.sub(tier, ws.numel() * ws.element_size())
        self._ws.clear()


class HostAttention:
    """Attention on the host for rows whose cache stays in host memory (cpu_cache_compute
    on CUDA), on the compute thread.

    The new k/v, q and the mask go down through page-locked buffers with non-blocking
    copies and one event (a single host wait per group), instead of four blocking
    transfers; the cache is attended in HOST_ATTN_DTYPE through a workspace reused by
    every layer; the result goes back up from page-locked memory without blocking. Every
    buffer is reused: the next write to one follows an event recorded after the copy
    that last read it (all on the compute stream).
    """

    def __init__(self, device: ComputeDevice, tracker: MemoryTracker, packed: Optional[PackedAttention] = None):
        self.device, self.tracker, self.packed = device, tracker, packed
        self._bufs: dict[str, torch.Tensor] = {}
        self.held = 0

    def _buf(self, name: str, shape, dtype, pin: bool) -> torch.Tensor:
        nbytes = _nbytes(shape, dtype)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            grow = nbytes
            if buf is not None:   # the mask and workspace grow by a position per step: double
                grow = max(nbytes, 2 * buf.numel())
                self.tracker.sub(Tier.CPU, buf.numel())
                self.held -= buf.numel()
            buf = self._bufs[name] = self.device.host_bytes(grow, pin=pin)
            self.tracker.add(Tier.CPU, buf.numel())
            self.held += buf.numel()
        return buf[:nbytes].view(dtype).view(shape)

    def _down(self, name: str, x: torch.Tensor) -> torch.Tensor:
        out = self._buf(name, x.shape, x.dtype, pin=True)
        out.copy_(x, non_blocking=True)
        return out

    def prepare(self, g: "_Group", t: int, k: torch.Tensor, v: torch.Tensor):
        """Start this step's k/v (s, r, h) down to the host; returns the group's `attend`."""
        # Staged per group: every group's k/v is down before any group attends.
        nk, nv = self._down(f"k{g.rows.start}", k), self._down(f"v{g.rows.start}", v)

        def attend(q: torch.Tensor, mask: torch.Tensor, fn):
            hq = self._down("q", q)
            hm = None if mask is None else self._down("mask", mask)
            done = torch.cuda.Event()
            done.record(self.device.stream)
            done.synchronize()          # the one wait: q, mask, k, v are on the host
            if g.packed is not None:
                out = self.packed.attend(g.tier, hq, g.packed, nk, nv, hm, fn)
                g.packed = None
            else:
                s = nk.shape[0]
                g.k[t:t + s].copy_(nk)
                g.v[t:t + s].copy_(nv)
                keys, values = g.k[:t + s], g.v[:t + s]
                if keys.dtype != HOST_ATTN_DTYPE:
                    keys = self._buf("wk", keys.shape, HOST_ATTN_DTYPE, pin=False).copy_(keys)
                    values = self._buf("wv", values.shape, HOST_ATTN_DTYPE, pin=False).copy_(values)
                out = fn(hq.to(HOST_ATTN_DTYPE), keys, values, hm)
            up = self._buf("out", out.shape, q.dtype, pin=True)
            up.copy_(out)
            return up.to(q.device, non_blocking=True)
        return attend

    def close(self):
        self.tracker.sub(Tier.CPU, self.held)
        self.held = 0
        self._bufs.clear()


class KVSlot:
    def __init__(self, parts: list[_Part], device: ComputeDevice, dtype: torch.dtype, hidden: int,
                 cpu_cache_compute: bool, tracker: MemoryTracker):
        self.parts, self.device, self.dtype, self.hidden = parts, device, dtype, hidden
        self.cpu_cache_compute, self.tracker = cpu_cache_compute, tracker
        self.host_attention: Optional[HostAttention] = None   # set by KVCache on CUDA
        self.packed_attention: Optional[PackedAttention] = None   # set by KVCache when compressed
        self.buffers: Optional[HostBuffers] = None            # set by KVCache
        self.read_priority: Optional[ReadPriority] = None    # set by KVCache: disk reads go first
        self.last_store = None   # future of the last `end`; the next `begin` waits for it
        # Wholly on the gpu tier and uncompressed: begin/end only take views, no I/O.
        self.resident = len(parts) == 1 and parts[0].tier is Tier.GPU and parts[0].k.view(1) is not None

    def begin(self, t: int, s: int) -> KVWork:
        """Prepare attention over positions [0, t + s) (I/O thread).

        One attention group per part: a part that lives where its rows attend (the
        compute device, or host memory with cpu_cache_compute) and is uncompressed is
        used in place; every other part is read into a working buffer of its own rows
        only, so that resident rows are never copied and disk rows land in their buffer
        directly.
        """
        work = KVWork(self, t)
        if t == 0:
            return work
        try:
            self._read_groups(work, t, s)
        except BaseException:
            self.discard(work)
            raise
        return work

    def _read_groups(self, work: KVWork, t: int, s: int) -> None:
        host = torch.device("cpu")
        for p in self.parts:
            on_host = self.cpu_cache_compute and p.tier is not Tier.GPU
            device, home = (host, Tier.CPU) if on_host else (self.device.device, Tier.GPU)
            g = _Group(slice(p.start, p.stop), device, [p], host=on_host, tier=home)
            if p.tier is home and p.k.view(1) is not None:
                g.k, g.v, g.live = p.k.view(t + s), p.v.view(t + s), True
            else:
                shape = (t + s, p.stop - p.start, self.hidden)
                # Packed rows attending on the host need no working K/V (PackedAttention).
                packed = _stays_packed(p, device)
                take = None
                if device.type == "cpu" and self.buffers is not None:
                    def take(shape, capacity, dtype, home=home):
                        return self.buffers.take(work, shape, capacity, dtype, home)
                    if not packed:
                        g.k = take(shape, p.k.shape[0], self.dtype)
                        g.v = take(shape, p.k.shape[0], self.dtype)
                elif not packed:
                    g.k = _buffer(shape, self.dtype, self.device, on_host)
                    g.v = _buffer(shape, self.dtype, self.device, on_host)
                    nbytes = 2 * g.k.numel() * g.k.element_size()
                    self.tracker.add(home, nbytes)
                    work.tracked.append((home, nbytes))
                # Positions t.. of the buffer are filled by KVWork.update afterwards.
                # Compute needs these rows next: their disk reads go ahead of the weights'.
                with urgent(self.read_priority if p.tier is Tier.DISK else None):
                    self._read_part(p, g, t, on_host, device, take)
                if not on_host and g.k is not None:   # compute writes, reads and frees them
                    self.device.hand_off(g.k)
                    self.device.hand_off(g.v)
            work.groups.append(g)

    @staticmethod
    def _read_part(p: _Part, g: _Group, t: int, on_host: bool, device: torch.device, take) -> None:
        """Fill a group's working buffers (or packed arrays) from its part."""
        if _stays_packed(p, device):
            # Dequantized on the compute thread (PackedAttention): here it would hold
            # this I/O thread off the disk while it runs, and on a CPU it takes the
            # same cores either way. Packed rows already in host memory are
            # dequantized where they are: a copy would move the same bytes once
            # more, on the I/O thread, through the same memory and cores.
            if p.tier is Tier.DISK:
                g.packed = (p.k.read_packed(t, on_host, take), p.v.read_packed(t, on_host, take))
            else:
                g.packed = (p.k.packed_view(t), p.v.packed_view(t))
        else:
            p.k.read(t, g.k[:t], scratch_after=True, host=on_host, take=take)
            p.v.read(t, g.v[:t], scratch_after=True, host=on_host, take=take)

    def end(self, work: KVWork) -> None:
        """Write this step's new positions to every part not updated in place (I/O thread,
        on its side stream after compute's mark; the caller waits for the copies)."""
        t = work.t
        live = {id(p) for g in work.groups if g.live for p in g.parts}
        for p in self.parts:
            if id(p) in live:
                continue
            p.k.write(t, work.new_k[:, p.start:p.stop])
            p.v.write(t, work.new_v[:, p.start:p.stop])
        self.discard(work)

    def discard(self, work: KVWork) -> None:
        """Release the working buffers of `work`: after `end`, or for a prefetched load
        that is never computed (every sequence stopped first)."""
        for tier, nbytes in work.tracked:
            self.tracker.sub(tier, nbytes)
        work.tracked.clear()
        if work.pooled:
            self.buffers.give(work)


class KVCache:
    """The KV cache of one block: `slot(layer, batch)` for every attention layer and gpu batch."""

    def __init__(self, num_layers: int, num_batches: int, rows: RowSplit, max_len: int, hidden: int,
                 dtype: torch.dtype, device: ComputeDevice, tracker: MemoryTracker, run_dir: Path,
                 compress: bool = False, cpu_cache_compute: bool = False,
                 read_priority: Optional[ReadPriority] = None):
        self.tracker = tracker
        self.files: list[DiskFile] = []
        self.slots: dict[tuple[int, int], KVSlot] = {}
        self.held = {t: 0 for t in Tier}
        disk_rows = rows.disk
        # Packed rows attending on the host share one PackedAttention, and on CUDA host rows
        # attend through one HostAttention (compute thread, reused buffers).
        self.packed_attention = (PackedAttention(tracker, max_len, rows.gpu + rows.cpu + rows.disk, hidden)
                                 if compress else None)
        self.host_attention = None
        if cpu_cache_compute and device.is_cuda and (rows.cpu or rows.disk):
            self.host_attention = HostAttention(device, tracker, self.packed_attention)
        self.staging, self.staging_bytes = None, 0
        self.buffers = HostBuffers(tracker)
        if disk_rows and device.is_cuda and not cpu_cache_compute:
            # Disk rows bound for the device: one read in flight per load thread, the
            # largest being one K or V array.
            biggest = max(_nbytes(sh, dt) for sh, dt in
                          kv_array_specs((max_len, disk_rows, hidden), dtype, compress).values())
            self.staging = PinnedStaging(device, biggest, count=2)
            self.staging_bytes = 2 * align_up(biggest)
            tracker.add(Tier.CPU, self.staging_bytes)
        per_array = sum(align_up(_nbytes(sh, dt)) for sh, dt in
                        kv_array_specs((max_len, disk_rows, hidden), dtype, compress).values())
        for layer in range(num_layers):
            arena = None
            if disk_rows:
                arena = _Arena(DiskFile(run_dir / f"kv_layer_{layer:04d}.bin", 2 * num_batches * per_array))
                self.files.append(arena.file)
            for b in range(num_batches):
                parts = []
                for tier, start, stop in rows.ranges():
                    alloc = arena.alloc if tier is Tier.DISK else None
                    k = KVArray(tier, max_len, stop - start, hidden, dtype, device, compress, alloc, self.staging)
                    v = KVArray(tier, max_len, stop - start, hidden, dtype, device, compress, alloc, self.staging)
                    parts.append(_Part(tier, start, stop, k, v))
                    self.held[tier] += k.nbytes + v.nbytes
                self.slots[(layer, b)] = KVSlot(parts, device, dtype, hidden, cpu_cache_compute, tracker)
                self.slots[(layer, b)].host_attention = self.host_attention
                self.slots[(layer, b)].packed_attention = self.packed_attention
                self.slots[(layer, b)].buffers = self.buffers
                self.slots[(layer, b)].read_priority = read_priority
        for tier, n in self.held.items():
            tracker.add(tier, n)

    def slot(self, layer: int, batch: int) -> KVSlot:
        return self.slots[(layer, batch)]

    @property
    def direct_io(self) -> Optional[bool]:
        return all(f.direct for f in self.files) if self.files else None

    def close(self) -> None:
        for f in self.files:
            f.unlink()
        self.files.clear()
        for tier, n in self.held.items():
            self.tracker.sub(tier, n)
        self.held = {t: 0 for t in Tier}
        self.tracker.sub(Tier.CPU, self.staging_bytes)
        self.staging, self.staging_bytes = None, 0
        self.buffers.close()
        if self.host_attention is not None:
            self.host_attention.close()
            self.host_attention = None
        if self.packed_attention is not None:
            self.packed_attention.close()
            self.packed_attention = None
        self.slots.clear()


class _Arena:
    """Hands out aligned regions of one disk file per layer (few files, few descriptors)."""

    def __init__(self, file: DiskFile):
        self.file, self.used = file, 0

    def alloc(self, nbytes: int) -> tuple[DiskFile, int]:
        base, self.used = self.used, align_up(self.used + nbytes)
        assert self.used <= align_up(self.file.nbytes), "KV arena overflow"
        return self.file, base
