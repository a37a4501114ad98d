"""A fake CUDA runtime, so the engine's `is_cuda` branches run (and are checked) on a CPU.

Tensors stay on the CPU and kernels run synchronously, so a stream race cannot change
any token here. Instead the fake records what a real race needs and checks the rules
that prevent it, following how CUDA behaves:

- Streams and events: `torch.cuda.stream(s)` sets the calling thread's current stream;
  `Event.record()` records on the current stream; `wait_event` / `synchronize` are
  logged. Every host synchronisation is logged with its thread.
- The caching allocator hands a block back to the *stream that allocated it* as soon as
  the tensor's last Python reference dies, without waiting for kernels queued on other
  streams; only `record_stream(s)` defers that. So every tensor handed from an I/O
  thread to the compute thread must have been allocated on the compute thread (the
  compute stream's pool, in stream order with the kernels that use it), or allocated on
  a side stream and `record_stream`ed on the compute stream. A tensor allocated by an
  I/O thread while the compute stream is current (outside its side stream) may be a
  block that compute has just freed but whose kernels are still running: a race.
  A dispatch mode on every thread records the thread and current stream that created
  each storage; the scheduler's hand-offs are checked against those records.
- Pinned memory: `torch.empty(pin_memory=True)` and `Tensor.pin_memory()` go through
  torch's caching host allocator, which rounds every block up to a power of two and
  never gives it back; `cudaHostRegister` pins exactly the pages given. Both are logged
  with the bytes requested and the bytes really reserved.

Only used inside the `fake_cuda` fixture, which undoes every patch at teardown.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

PAGE = 4096


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class FakeStream:
    _ids = iter(range(1_000_000))

    def __init__(self, device=None, priority=0, *, fake=None, name=None):
        self.fake = fake
        self.id = next(FakeStream._ids)
        self.name = name or f"side{self.id}"
        self.waited: list = []

    def wait_event(self, event):
        if event is not None:
            self.waited.append(event)
            self.fake.log.append(("wait_event", threading.current_thread().name, self.name, event.stream_name))

    def wait_stream(self, other):
        self.fake.log.append(("wait_stream", threading.current_thread().name, self.name, other.name))

    def synchronize(self):
        self.fake.host_sync(f"stream {self.name}")

    def record_event(self, event=None):
        event = event or self.fake.Event()
        event.record(self)
        return event

    def query(self):
        return True

    def __repr__(self):
        return f"<FakeStream {self.name}>"


class FakeEvent:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False, *, fake=None):
        self.fake = fake
        self.stream_name = None
        self.timing = enable_timing
        self.t = None

    def record(self, stream=None):
        import time
        stream = stream or self.fake.current_stream()
        self.stream_name = stream.name
        self.t = time.perf_counter()
        self.fake.log.append(("record", threading.current_thread().name, stream.name))

    def wait(self, stream=None):
        (stream or self.fake.current_stream()).wait_event(self)

    def synchronize(self):
        self.fake.host_sync(f"event on {self.stream_name}")

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000.0


@dataclass
class Alloc:
    thread: str
    stream: str


@dataclass
class FakeCuda:
    compute_thread: str = field(default_factory=lambda: threading.current_thread().name)
    log: list = field(default_factory=list)
    syncs: list = field(default_factory=list)           # (thread, what)
    allocs: dict = field(default_factory=dict)          # storage data_ptr -> Alloc
    recorded: dict = field(default_factory=dict)        # storage data_ptr -> set of stream names
    violations: list = field(default_factory=list)
    handoffs: int = 0
    pinned_live: dict = field(default_factory=dict)     # key -> (requested, reserved)
    pinned_requested_peak: int = 0
    pinned_reserved_peak: int = 0
    pinned_requests: list = field(default_factory=list)  # (requested, reserved, how)
    memory_fraction: float = None
    set_device_threads: set = field(default_factory=set)   # threads that called set_device
    timing_events: int = 0
    total_memory: int = 80 << 30

    def __post_init__(self):
        self._lock = threading.Lock()
        self._local = threading.local()
        self.default_stream = FakeStream(fake=self, name="compute")

    # -- streams ----------------------------------------------------------------------
    def current_stream(self, device=None):
        return getattr(self._local, "stream", None) or self.default_stream

    def Stream(self, device=None, priority=0):
        return FakeStream(device, priority, fake=self)

    def Event(self, enable_timing=False, blocking=False, interprocess=False):
        self.timing_events += bool(enable_timing)
        return FakeEvent(enable_timing, blocking, interprocess, fake=self)

    def set_device(self, device):
        with self._lock:
            self.set_device_threads.add(threading.current_thread().name)

    def get_device_properties(self, device=None):
        from types import SimpleNamespace
        return SimpleNamespace(name="FakeGPU", total_memory=self.total_memory)

    @contextlib.contextmanager
    def stream(self, s):
        prev = getattr(self._local, "stream", None)
        self._local.stream = s
        try:
            yield
        finally:
            self._local.stream = prev

    def host_sync(self, what: str):
        with self._lock:
            self.syncs.append((threading.current_thread().name, what))

    def synchronize(self, device=None):
        self.host_sync("device")

    def syncs_on(self, thread: str) -> list:
        return [w for t, w in self.syncs if t == thread]

    # -- allocations --------------------------------------------------------------------
    def note_alloc(self, ptr: int):
        with self._lock:
            self.allocs[ptr] = Alloc(threading.current_thread().name, self.current_stream().name)
            self.recorded.pop(ptr, None)

    def record_stream(self, t: torch.Tensor, stream):
        with self._lock:
            self.recorded.setdefault(t.untyped_storage().data_ptr(), set()).add(stream.name)

    def check_handoff(self, what: str, t: torch.Tensor):
        """t is handed from an I/O task to compute: it must be safe on the compute stream."""
        self.handoffs += 1
        ptr = t.untyped_storage().data_ptr()
        with self._lock:
            a = self.allocs.get(ptr)
            rec = self.recorded.get(ptr, set())
        if a is None or a.thread == self.compute_thread:
            return   # allocated by compute (or before the run): in stream order with its users
        if a.stream == self.default_stream.name:
            self.violations.append(f"{what}: allocated on {a.thread} from the compute stream's pool "
                                   f"(a block compute just freed may still be in use)")
        elif self.default_stream.name not in rec:
            self.violations.append(f"{what}: allocated on {a.thread}'s stream {a.stream} and handed to "
                                   f"compute without record_stream")

    # -- pinned memory --------------------------------------------------------------------
    def _pin(self, key, requested: int, reserved: int, how: str, owner=None):
        with self._lock:
            self.pinned_requests.append((requested, reserved, how))
            self.pinned_live[key] = (requested, reserved)
            self._update_peaks()
        if owner is not None:
            weakref.finalize(owner, self._unpin, key)

    def _unpin(self, key):
        with self._lock:
            self.pinned_live.pop(key, None)

    def _update_peaks(self):
        req = sum(r for r, _ in self.pinned_live.values())
        res = sum(r for _, r in self.pinned_live.values())
        self.pinned_requested_peak = max(self.pinned_requested_peak, req)
        self.pinned_reserved_peak = max(self.pinned_reserved_peak, res)

    def cudaHostRegister(self, ptr, size, flags):
        self._pin(("reg", ptr), size, (size + PAGE - 1) // PAGE * PAGE, "register")
        return 0

    def cudaHostUnregister(self, ptr):
        self._unpin(("reg", ptr))
        return 0


class _AllocMode(TorchDispatchMode):
    """Records the thread and stream that create every new storage."""

    def __init__(self, fake: FakeCuda):
        super().__init__()
        self.fake = fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = set()
        for a in list(args) + list((kwargs or {}).values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor):
                    seen.add(t.untyped_storage().data_ptr())
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    self.fake.note_alloc(ptr)
        return out


def _walk_handoff(fake: FakeCuda, value, where: str):
    """The device tensors in a value an I/O future hands to compute."""
    from flexgen.kvcache import KVWork
    from flexgen.memory import Tier
    from flexgen.weights import LoadedLayer
    if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[0], torch.Tensor):
        value = value[0]   # (result, ready event)
    if isinstance(value, torch.Tensor):
        fake.check_handoff(f"{where} hidden", value)
    elif isinstance(value, LoadedLayer):
        for key, t in value.arrays.items():
            fake.check_handoff(f"{where} weight {key}", t)
    elif isinstance(value, KVWork):
        for g in value.groups:
            on_host = value.slot.cpu_cache_compute and any(p.tier is not Tier.GPU for p in g.parts)
            if g.live or on_host or g.packed is not None:   # packed: no working K/V (PackedAttention)
                continue
            fake.check_handoff(f"{where} kv working K", g.k)
            fake.check_handoff(f"{where} kv working V", g.v)


@pytest.fixture(name="fake_cuda")
def fake_cuda_fixture(monkeypatch):
    """Runs the engine's CUDA branches on the CPU (load models with device="cpu")."""
    from flexgen import device, iopool, scheduler

    fake = FakeCuda()
    cuda = torch.cuda
    monkeypatch.setattr(device.ComputeDevice, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda, "set_device", fake.set_device)
    monkeypatch.setattr(cuda, "get_device_properties", fake.get_device_properties)
    monkeypatch.setattr(cuda, "Stream", fake.Stream)
    monkeypatch.setattr(cuda, "Event", fake.Event)
    monkeypatch.setattr(cuda, "stream", fake.stream)
    monkeypatch.setattr(cuda, "current_stream", fake.current_stream)
    monkeypatch.setattr(cuda, "default_stream", lambda device=None: fake.default_stream)
    monkeypatch.setattr(cuda, "synchronize", fake.synchronize)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(cuda, "max_memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(cuda, "set_per_process_memory_fraction",
                        lambda f, device=None: setattr(fake, "memory_fraction", f))
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (16 << 30, 16 << 30))
    monkeypatch.setattr(cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: fake.record_stream(t, s))
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t, device=None: ("reg", t.untyped_storage().data_ptr())
                        in fake.pinned_live or ("alloc", t.untyped_storage().data_ptr()) in fake.pinned_live)

    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kw):
        t = real_empty(*args, **kw)
        if pin_memory:
            n = t.untyped_storage().nbytes()
            fake._pin(("alloc", t.untyped_storage().data_ptr()), n, _pow2(n), "pin_memory=True", owner=t)
        return t

    def pin_memory(t, device=None):
        c = t.clone()
        n = c.untyped_storage().nbytes()
        fake._pin(("alloc", c.untyped_storage().data_ptr()), n, _pow2(n), "Tensor.pin_memory", owner=c)
        return c

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)

    # Allocation records on every thread: the compute thread here, I/O threads per task.
    real_submit = iopool.IOPool.submit

    def submit(self, fn, *args, **kw):
        def run(*a):
            with _AllocMode(fake):
                return fn(*a)
        return real_submit(self, run, *args, **kw)

    monkeypatch.setattr(iopool.IOPool, "submit", submit)

    real_wait = scheduler.Scheduler._wait

    def wait(self, fut, *a, **kw):
        out = real_wait(self, fut, *a, **kw)
        if fut is not None and out is not None:
            _walk_handoff(fake, out, threading.current_thread().name)
        return out

    monkeypatch.setattr(scheduler.Scheduler, "_wait", wait)
    with _AllocMode(fake):
        yield fake
