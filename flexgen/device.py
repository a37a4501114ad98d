"""The compute device, and the CUDA-only pieces (side streams, events, pinned memory)
behind one small interface; on a CPU device they are no-ops, so every other code path is
the same on both. Also the compute dtypes by name, the one map of them.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from flexgen.diskio import ALIGN, align_up, aligned_empty, aligned_view
from flexgen.errors import FlexGenError

# Compute dtypes by name (--dtype, HardwareProfile.compute_dtype), with the short aliases
# load_model accepts.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype's name as DTYPES, config files and reports spell it ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


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


ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def prefer_expandable_segments(environ=os.environ,
                               setter=getattr(torch._C, "_accelerator_setAllocatorSettings", None)) -> bool:
    """Ask torch's CUDA caching allocator for expandable segments, unless the user has
    configured the allocator (either variable set; `expandable_segments:False` opts out).

    With fixed-size segments, a prefill's large working tensors freed and reallocated
    beside the KV cache left 2 GiB reserved but unusable under a 16 GiB cap (OPT-6.7B on
    an H200): the 1.5 GiB allocation that failed fitted in the cap. Set at run time (the
    setting applies to segments allocated from then on), else through the variable,
    which torch reads when CUDA initializes. Returns whether flexgen set it."""
    if any(environ.get(k) for k in ALLOC_CONF_VARS):
        return False
    if setter is not None:
        setter("expandable_segments:True")
    else:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return True


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
            prefer_expandable_segments()
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
        if not (pin and self.is_cuda):
            return aligned_empty(nbytes)
        # The memory is owned by a numpy array, which the tensor's storage holds until the
        # last view dies: its finalizer unregisters then. A finalizer on the base *tensor*
        # fired as soon as the caller kept only a view (the base's Python object dies with
        # the first view), which left host weights pageable on CUDA.
        owner = np.empty(align_up(max(nbytes, 1)) + ALIGN, dtype=np.uint8)
        buf = aligned_view(torch.from_numpy(owner), nbytes)
        self._register(buf, owner)
        return buf

    def _register(self, buf: torch.Tensor, owner) -> None:
        n, ptr = buf.numel(), buf.data_ptr()   # whole pages: buf is page-aligned and sized
        err = torch.cuda.cudart().cudaHostRegister(ptr, n, 0)
        if int(err) != 0:
            raise FlexGenError(f"cannot page-lock {n / 2**30:.2f} GiB of host memory (CUDA error {int(err)}); "
                               "use --no-pin-weight or keep less in host memory")
        with self._lock:
            self.pinned_bytes += n
            self.pinned_peak = max(self.pinned_peak, self.pinned_bytes)
        weakref.finalize(owner, self._unregister, ptr, n)

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


__all__ = ["DTYPES", "ComputeDevice", "PinnedStaging", "cpu_has_bf16", "default_dtype", "dtype_name"]
