"""The disk tier's files: preallocated, read and written with O_DIRECT where the file
system allows it, and the page-aligned host buffers such reads land in.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import torch

from flexgen.errors import FlexGenError

ALIGN = 4096  # O_DIRECT offset/size/buffer alignment that every common file system accepts
# A large read is issued in pieces of this size, so that a small read from another thread
# (the next KV-cache load) queues behind one piece rather than a whole layer's weights.
# Measured on a virtual disk: a 12 MiB read beside a 268 MiB one waited ~100 ms unsplit,
# ~10 ms with 16 MiB pieces and ~22 ms with 64 MiB ones; the large read lost <= 9 %.
READ_PIECE = 32 << 20


def drop_cached(fd: int) -> None:
    """Drop a file's clean pages from the page cache (where the OS can): reads that follow
    measure the disk, and the pages stop counting against a memory cgroup."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A pageable host uint8 buffer whose data pointer and length are ALIGN-aligned (for
    O_DIRECT). Page-locked memory comes from ComputeDevice.host_bytes, never from torch's
    pinned allocator (which rounds every block up to a power of two)."""
    return aligned_view(torch.empty(align_up(max(nbytes, 1)) + ALIGN, dtype=torch.uint8), nbytes)


def aligned_view(raw: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The align_up(nbytes) bytes of a uint8 buffer of at least that + ALIGN that start on an
    ALIGN boundary."""
    n = align_up(max(nbytes, 1))
    start = (-raw.data_ptr()) % ALIGN
    return raw[start:start + n]


def aligned_host_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor that starts on an ALIGN boundary, so a disk read can land in it directly."""
    nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    return aligned_empty(nbytes)[:nbytes].view(dtype).view(shape)


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

    def read(self, offset: int, dst: torch.Tensor, scratch_after: bool = False,
             yield_to: Optional["ReadPriority"] = None) -> None:
        """Fill a contiguous host tensor with the bytes at `offset`.

        `scratch_after`: the caller owns the bytes of dst's storage after dst up to the next
        page boundary and does not need them (a working buffer's unfilled end), so an
        aligned read may fill them too: one disk operation instead of two.
        `yield_to`: a long background read lets urgent reads go first, between pieces.
        """
        gate = yield_to.wait_turn if yield_to is not None else None
        out = as_bytes(dst)
        n = len(out)
        with self._lock:
            self.bytes_read += n
        if n == 0:
            return
        if self.direct_fd is None:
            self._read_exact(self.fd, out, offset, gate=gate)
            return
        if scratch_after and offset % ALIGN == 0 and dst.data_ptr() % ALIGN == 0:
            storage = dst.untyped_storage()
            begin = dst.data_ptr() - storage.data_ptr()
            # Whole pages only where the file has them (a file opened with create=False
            # may end mid-page).
            if storage.nbytes() - begin >= align_up(n) and offset + align_up(n) <= self._size:
                whole = torch.empty(0, dtype=torch.uint8).set_(storage, begin, (align_up(n),))
                self._read_exact(self.direct_fd, as_bytes(whole), offset, gate=gate)
                return
        # O_DIRECT: aligned file range into an aligned buffer. When offset and `dst` are
        # aligned, the whole pages go straight into `dst` and only the last partial page
        # passes through a small bounce buffer (a KV cache read is rarely a page multiple).
        start = offset // ALIGN * ALIGN
        end = align_up(offset + n)
        if start == offset and dst.data_ptr() % ALIGN == 0:
            head = n // ALIGN * ALIGN
            if head:
                self._read_exact(self.direct_fd, out[:head], offset, gate=gate)
            if head < n:
                tail = aligned_empty(ALIGN)
                self._read_exact(self.direct_fd, as_bytes(tail), offset + head, allow_short=True)
                dst.view(torch.uint8).reshape(-1)[head:].copy_(tail[:n - head])
            return
        bounce = aligned_empty(end - start)
        self._read_exact(self.direct_fd, as_bytes(bounce), start, allow_short=True, gate=gate)
        dst.view(torch.uint8).reshape(-1).copy_(bounce[offset - start:offset - start + n])

    def _read_exact(self, fd, out: memoryview, offset: int, allow_short: bool = False, gate=None):
        done = 0
        while done < len(out):
            if gate is not None:
                gate()
            n = os.preadv(fd, [out[done:done + READ_PIECE]], offset + done)
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


class ReadPriority:
    """Urgent disk reads go ahead of a long background read stream.

    The next layer's weights are read while this layer computes, in pieces of READ_PIECE
    bytes; the KV cache (and hidden states) of the next gpu batch is read beside them
    and is needed sooner. Sharing the disk, each of a cache load's reads queued behind a
    whole weight piece: a 4-layer OPT-13B-width decode with 91 % of its 4-bit cache on
    disk spent 80-120 ms per cache load and waited for them. So a background reader
    waits, before each piece, while an urgent read is under way.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._urgent = 0

    @contextmanager
    def urgent(self):
        with self._cond:
            self._urgent += 1
        try:
            yield
        finally:
            with self._cond:
                self._urgent -= 1
                if not self._urgent:
                    self._cond.notify_all()

    def wait_turn(self) -> None:
        """Return once no urgent read is under way (called by a background reader)."""
        with self._cond:
            while self._urgent:
                self._cond.wait()


def urgent(priority: Optional[ReadPriority]):
    """`priority.urgent()`, or nothing when there is no priority to give way to."""
    return priority.urgent() if priority is not None else nullcontext()


__all__ = ["ALIGN", "DiskFile", "ReadPriority", "urgent", "align_up", "aligned_empty", "aligned_host_empty", "aligned_view", "as_bytes", "drop_cached"]
