"""Memory tiers and the pieces that move bytes between them.

- `Tier`: gpu (memory of the compute device), cpu (host memory), disk (files).
- `ComputeDevice`: the compute device plus the CUDA-only pieces (side streams, events,
  pinned memory) behind one small interface; on a CPU device they are no-ops, so every
  other code path is the same on both.
- `DiskFile`: a preallocated file read with O_DIRECT where the file system allows it.
- `IOPool`: a few threads that run loads and stores while the compute thread computes.
- `MemoryTracker`: bytes held per tier, with peaks.
"""

from __future__ import annotations

import enum
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from flexgen.errors import FlexGenError

ALIGN = 4096  # O_DIRECT offset/size/buffer alignment that every common file system accepts


class Tier(enum.Enum):
    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


TIERS = (Tier.GPU, Tier.CPU, Tier.DISK)


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; bf16 on a CPU with native bf16 matmul, else fp32 (never fp16 on CPU)."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A pageable host uint8 buffer whose data pointer and length are ALIGN-aligned (for
    O_DIRECT). Page-locked memory comes from ComputeDevice.host_bytes, never from torch's
    pinned allocator (which rounds every block up to a power of two)."""
    n = align_up(max(nbytes, 1))
    raw = torch.empty(n + ALIGN, dtype=torch.uint8)
    start = (-raw.data_ptr()) % ALIGN
    return raw[start:start + n]


def aligned_host_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor that starts on an ALIGN boundary, so a disk read can land in it directly."""
    nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    return aligned_empty(nbytes)[:nbytes].view(dtype).view(shape)


class ComputeDevice:
    """The device that computes, and how I/O threads hand data to it.

    On CUDA an I/O task runs on its thread's side stream (`io_task`): it first waits, on
    the GPU, for a `mark()` recorded on the compute stream (buffers compute may still
    read), and returns an event that the compute stream waits on (`wait`), so neither
    the I/O thread nor the compute thread waits for the GPU. A task whose result the
    host must see (a device-to-host copy before a disk write) synchronises its own
    stream instead. A tensor allocated on a side stream and handed to compute goes
    through `hand_off` (record_stream): the caching allocator would otherwise give its
    block to the side stream's next allocation while compute still reads it.

    Pinned host memory is page-locked exactly (pageable memory + cudaHostRegister):
    torch's pinned allocator rounds every block up to a power of two and keeps it, which
    for a 100 GiB host tier reserves up to twice that.
    """

    def __init__(self, device: str | torch.device | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise FlexGenError("--device cuda was requested but no CUDA device is available")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.device.type != "cpu":
            raise FlexGenError(f"unsupported device {device!r}; use cpu or cuda")
        self._local = threading.local()
        self._lock = threading.Lock()
        self.pinned_bytes = self.pinned_peak = 0   # page-locked host bytes, now and at most
        # The engine's compute stream: the current stream of *its* device (cuda:N), not
        # of whichever device happens to be current.
        self.stream = torch.cuda.current_stream(self.device) if self.is_cuda else None

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    # -- memory ---------------------------------------------------------------------------

    def host_empty(self, shape, dtype, pin: bool = False) -> torch.Tensor:
        """Host memory, page-aligned; page-locked when `pin` and the device is CUDA. Pin
        only what is copied to the device asynchronously and often: page-locked memory
        cannot be swapped, and a large amount of it starves the host."""
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        return self.host_bytes(nbytes, pin)[:nbytes].view(dtype).view(shape)

    def host_bytes(self, nbytes: int, pin: bool = False) -> torch.Tensor:
        """An ALIGN-aligned uint8 host buffer of align_up(nbytes) (see aligned_empty)."""
        buf = aligned_empty(nbytes)
        if pin and self.is_cuda:
            self._register(buf, buf._base if buf._base is not None else buf)
        return buf

    def _register(self, buf: torch.Tensor, raw: torch.Tensor) -> None:
        n, ptr = buf.numel(), buf.data_ptr()   # whole pages: buf is page-aligned and sized
        err = torch.cuda.cudart().cudaHostRegister(ptr, n, 0)
        if int(err) != 0:
            raise FlexGenError(f"cannot page-lock {n / 2**30:.2f} GiB of host memory (CUDA error {int(err)}); "
                               "use --no-pin-weight or keep less in host memory")
        with self._lock:
            self.pinned_bytes += n
            self.pinned_peak = max(self.pinned_peak, self.pinned_bytes)
        # Unregistered when the buffer (and every view of it, which holds it as _base) dies.
        weakref.finalize(raw, self._unregister, ptr, n)

    def _unregister(self, ptr: int, n: int) -> None:
        try:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:   # at interpreter exit CUDA may be gone; the process ends anyway
            pass
        with self._lock:
            self.pinned_bytes -= n

    def empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def limit_memory(self, nbytes: Optional[float]) -> None:
        """Cap what torch's allocator may reserve on this device at `nbytes` (--gpu-mem), so
        a run on a larger card behaves like the card its policy was chosen for. CUDA only:
        on a CPU the gpu tier is budgeted by the policy alone."""
        if not self.is_cuda or nbytes is None:
            return
        total = torch.cuda.get_device_properties(self.device).total_memory
        if nbytes < total:
            torch.cuda.set_per_process_memory_fraction(nbytes / total, self.device)

    # -- streams ----------------------------------------------------------------------

    def clock(self):
        """A point in compute time: an event on the compute stream on CUDA (host time
        would only measure kernel launches), else the host clock. See `elapsed`."""
        if not self.is_cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.stream)
        return ev

    def elapsed(self, start, end) -> float:
        """Seconds between two clocks; on CUDA only once the stream has passed `end`."""
        if not self.is_cuda:
            return end - start
        return start.elapsed_time(end) / 1000.0

    def mark(self):
        """A point on the compute stream (None on CPU, where compute is synchronous)."""
        if not self.is_cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def wait(self, event) -> None:
        """Make the compute stream wait for an I/O task's event (no host sync)."""
        if event is not None:
            self.stream.wait_event(event)

    def hand_off(self, t: torch.Tensor) -> torch.Tensor:
        """t, allocated on an I/O side stream, is used (and freed) by compute."""
        if self.is_cuda:
            t.record_stream(self.stream)
        return t

    def _side_stream(self):
        stream = getattr(self._local, "stream", None)
        if stream is None:
            torch.cuda.set_device(self.device)   # I/O threads start on device 0
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream

    def io_task(self, fn, after=None, sync: bool = False):
        """fn wrapped to run on an I/O thread; the wrapper returns (result, ready event).

        On CUDA fn runs on the thread's side stream after `after`; `sync`: wait for the
        stream before returning (the host needs the bytes), and return no event.
        """
        def run(*args):
            if not self.is_cuda:
                return fn(*args), None
            stream = self._side_stream()
            with torch.cuda.stream(stream):
                if after is not None:
                    stream.wait_event(after)
                out = fn(*args)
            if sync:
                stream.synchronize()
                return out, None
            ev = torch.cuda.Event()
            ev.record(stream)
            return out, ev
        return run

    def sync_stream(self) -> None:
        """Wait for the copies queued on this thread's current stream (an I/O thread,
        before the host reads what they wrote)."""
        if self.is_cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def synchronize(self):
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


class PinnedStaging:
    """A few reusable host buffers that disk reads land in on their way to the device.

    `take()` hands out a free buffer once the device copy that last read it has finished
    (its event, given back to `give`); a fresh pinned buffer per read would cost a
    page-lock each time (and, from torch's pinned allocator, a power-of-two block).
    """

    def __init__(self, device: ComputeDevice, nbytes: int, count: int = 2):
        import queue
        self.device, self.nbytes = device, nbytes
        self._free: "queue.Queue" = queue.Queue()
        for _ in range(count):
            self._free.put((None, None))

    def take(self, nbytes: int) -> torch.Tensor:
        buf, ev = self._free.get()
        if ev is not None:
            ev.synchronize()   # an I/O thread waits, for a copy queued long ago
        if buf is None:
            buf = self.device.host_bytes(self.nbytes, pin=True)
        assert nbytes <= self.nbytes
        return buf

    def give(self, buf: torch.Tensor) -> None:
        """Return `buf` after queueing the copies that read it (on the current stream)."""
        ev = None
        if self.device.is_cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
        self._free.put((buf, ev))


def as_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous host tensor (no copy)."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


class DiskFile:
    """A fixed-size file of the disk tier.

    Reads and writes use O_DIRECT when the file system allows it, so timings measure the
    disk and not the page cache; `direct` says which mode is in force. Writes are small
    and unaligned (one token of KV cache), so a write rewrites the pages it touches whole:
    the other bytes of its first and last page come from the copy kept of the last
    partial page written there, or are read back (zeros past the bytes ever written).
    Buffered writes would leave dirty pages that every later O_DIRECT read of the range
    must first flush to disk and wait for, on the critical path (measured: 2-8 ms per
    KV-cache read). Concurrent writes must not share a page (the engine's regions are
    page-aligned).
    """

    def __init__(self, path: Path, nbytes: int, create: bool = True, direct: bool = True):
        self.path = Path(path)
        self.nbytes = nbytes
        self.bytes_read = self.bytes_written = 0   # what the engine asked for, for reports
        self._pages: dict[int, torch.Tensor] = {}    # offset -> last partial page written there
        self._lock = threading.Lock()
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise FlexGenError(f"cannot open {self.path}: {e.strerror}") from None
        existing = os.fstat(self.fd).st_size   # O_CREAT does not truncate: its bytes stay
        if create:
            try:
                os.ftruncate(self.fd, align_up(nbytes))  # sparse until written
            except OSError as e:
                os.close(self.fd)
                raise FlexGenError(f"cannot size {self.path}: {e.strerror}") from None
        self._size = os.fstat(self.fd).st_size
        self._high = min(existing, self._size)       # end of the bytes ever written (past it: zeros)
        self.direct_fd = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
            except OSError:
                self.direct_fd = None  # e.g. tmpfs: fall back to buffered reads

    @property
    def direct(self) -> bool:
        return self.direct_fd is not None

    def write(self, offset: int, src: torch.Tensor) -> None:
        """Write a contiguous host tensor's bytes at `offset`."""
        src = src.contiguous()
        buf = as_bytes(src)
        n = len(buf)
        with self._lock:
            self.bytes_written += n
        if n == 0:
            return
        if self.direct_fd is None:
            self._write_exact(self.fd, buf, offset)
            return
        end = offset + n
        start, stop = offset // ALIGN * ALIGN, align_up(end)
        if start == offset and stop == end and src.data_ptr() % ALIGN == 0:
            out = buf
        else:
            page = aligned_empty(stop - start)
            if start < offset:
                page[:ALIGN].copy_(self._page(start))
            last = stop - ALIGN
            if stop > end and not (start < offset and last == start):
                page[-ALIGN:].copy_(self._page(last))   # zeros past the bytes ever written
            page[offset - start:end - start].copy_(src.view(torch.uint8).reshape(-1))
            out = as_bytes(page)
        # I/O threads write other regions of the same file at the same time: the page
        # bookkeeping is shared, the pages themselves are not.
        with self._lock:
            for off in [o for o in self._pages if start <= o < stop]:
                del self._pages[off]
        self._write_exact(self.direct_fd, out, start)
        with self._lock:
            if stop > end:
                self._pages[stop - ALIGN] = page[-ALIGN:].clone()
            self._high = max(self._high, end)

    def _page(self, offset: int) -> torch.Tensor:
        """The current bytes of the page at `offset`: the kept copy, else read from disk."""
        with self._lock:
            kept, high = self._pages.get(offset), self._high
        if kept is not None:
            return kept
        page = aligned_empty(ALIGN)
        if offset < high:
            self._read_exact(self.direct_fd, as_bytes(page), offset, allow_short=True)
        else:
            page.zero_()
        return page

    def _write_exact(self, fd, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            try:
                done += os.pwrite(fd, buf[done:], offset + done)
            except OSError as e:
                raise FlexGenError(f"writing {self.path} failed: {e.strerror}") from None

    def read(self, offset: int, dst: torch.Tensor, scratch_after: bool = False) -> None:
        """Fill a contiguous host tensor with the bytes at `offset`.

        `scratch_after`: the caller owns the bytes of dst's storage after dst up to the next
        page boundary and does not need them (a working buffer's unfilled end), so an
        aligned read may fill them too: one disk operation instead of two.
        """
        out = as_bytes(dst)
        n = len(out)
        with self._lock:
            self.bytes_read += n
        if n == 0:
            return
        if self.direct_fd is None:
            self._read_exact(self.fd, out, offset)
            return
        if scratch_after and offset % ALIGN == 0 and dst.data_ptr() % ALIGN == 0:
            storage = dst.untyped_storage()
            begin = dst.data_ptr() - storage.data_ptr()
            # Whole pages only where the file has them (a file opened with create=False
            # may end mid-page).
            if storage.nbytes() - begin >= align_up(n) and offset + align_up(n) <= self._size:
                whole = torch.empty(0, dtype=torch.uint8).set_(storage, begin, (align_up(n),))
                self._read_exact(self.direct_fd, as_bytes(whole), offset)
                return
        # O_DIRECT: aligned file range into an aligned buffer. When offset and `dst` are
        # aligned, the whole pages go straight into `dst` and only the last partial page
        # passes through a small bounce buffer (a KV cache read is rarely a page multiple).
        start = offset // ALIGN * ALIGN
        end = align_up(offset + n)
        if start == offset and dst.data_ptr() % ALIGN == 0:
            head = n // ALIGN * ALIGN
            if head:
                self._read_exact(self.direct_fd, out[:head], offset)
            if head < n:
                tail = aligned_empty(ALIGN)
                self._read_exact(self.direct_fd, as_bytes(tail), offset + head, allow_short=True)
                dst.view(torch.uint8).reshape(-1)[head:].copy_(tail[:n - head])
            return
        bounce = aligned_empty(end - start)
        self._read_exact(self.direct_fd, as_bytes(bounce), start, allow_short=True)
        dst.view(torch.uint8).reshape(-1).copy_(bounce[offset - start:offset - start + n])

    def _read_exact(self, fd, out: memoryview, offset: int, allow_short: bool = False):
        done = 0
        while done < len(out):
            n = os.preadv(fd, [out[done:]], offset + done)
            if n == 0:
                if allow_short:
                    return
                raise FlexGenError(f"{self.path} is shorter than expected (truncated?)")
            done += n

    def close(self):
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None

    def unlink(self):
        self.close()
        self.path.unlink(missing_ok=True)


def page_cache_drop(path: Path) -> None:
    """Ask the kernel to forget a file's cached pages (for honest buffered-mode timings)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


class IOPool:
    """Threads that run loads and stores. Ordering between dependent tasks is explicit:
    a task that needs another's result is given its future and waits for it.

    Stores run on workers of their own: a store may wait for its device-to-host copy
    (and so for compute to reach its mark), and must not hold up the next layer's
    prefetch, which the cost model assumes runs beside it."""

    def __init__(self, num_threads: int = 2, store_threads: int = 1):
        # One intra-op thread per I/O worker (torch's setting is per thread): their copies
        # are memory-bound, and a full OpenMP team each would oversubscribe the cores the
        # compute thread's team runs on (seen as 5-30x stalls on a 2-core host).
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="flexgen-load",
                                        initializer=torch.set_num_threads, initargs=(1,))
        self._stores = ThreadPoolExecutor(max_workers=store_threads, thread_name_prefix="flexgen-store",
                                          initializer=torch.set_num_threads, initargs=(1,))

    def submit(self, fn, *args, store: bool = False) -> Future:
        return (self._stores if store else self._pool).submit(fn, *args)

    def shutdown(self):
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._stores.shutdown(wait=True, cancel_futures=True)


def done_future(value=None) -> Future:
    f = Future()
    f.set_result(value)
    return f


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


def direct_io_supported(directory: Path) -> bool:
    probe = Path(directory) / f".flexgen-odirect-{os.getpid()}"
    try:
        f = DiskFile(probe, ALIGN)
        ok = f.direct
        f.unlink()
        return ok
    except FlexGenError:
        return False


__all__ = ["Tier", "TIERS", "ComputeDevice", "DiskFile", "IOPool", "MemoryTracker", "PinnedStaging", "aligned_empty",
           "align_up", "default_dtype", "done_future", "page_cache_drop", "process_peak_rss"]
