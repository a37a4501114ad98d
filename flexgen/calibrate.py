"""Measure this machine into a HardwareProfile (`python -m flexgen profile`).

Outside the optimizer package because it times the engine's own kernels (and, with
`engine=True`, the engine itself); the optimizer only reads the profile it produces.
Every number is timed directly with small, representative kernels, best of a few runs:

- matmul throughput on the compute device (a prefill-sized GEMM, and by row count with
  weights cycled through more than the last-level cache, as a model's layers stream),
  its memory bandwidth (a large copy), attention throughput for prefill and for decode (the engine's fused
  `models.base.attend`, i.e. scaled_dot_product_attention), 4-bit dequantization speed
  and the KV cache's 4-bit quantization speed (as the engine stores it);
- the same attention and dequantization on the host, in fp32 (for cpu_cache_compute);
- cpu<->gpu bandwidth: pinned host<->device copies on CUDA, memory copies on a CPU;
- disk write and read bandwidth in the offload directory, with O_DIRECT so that the page
  cache is not measured (falling back to buffered I/O after dropping the file's pages,
  and saying so in `notes`);
- optionally, the engine's own fixed cost per layer step, from a short run on a dummy
  OPT-125M (`engine=True`).

On a CPU-only machine the compute device *is* the CPU: the "gpu" tier is a budget of
host memory (unified_memory), and the compute dtype is bfloat16 when the CPU has fast
bf16 kernels, else float32 (never float16: CPUs lack fp16 GEMM kernels).
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from flexgen.device import DTYPES
from flexgen.diskio import READ_PIECE, drop_cached
from flexgen.errors import ArgumentParser, FlexGenError
from flexgen.iopool import LOAD_THREADS
from flexgen.optimizer.hardware import DISK_PROBE, GIB, HardwareProfile, default_profile_path



def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeat: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GIB


def _process_reserve() -> int:
    """Host memory the engine's process needs besides its tensors: what this process holds
    now (Python, torch and its libraries, after the probes freed their buffers) plus room
    for the tokenizer, I/O threads and the allocator's slack."""
    try:
        resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 2 * GIB
    return resident + (512 << 20)


def pick_cpu_dtype(quick: bool = False) -> str:
    """The dtype the engine computes in on this CPU (device.default_dtype), so that the
    profile's figures and the policy's bytes are those of the runs it plans. (A timing
    race between bf16 and fp32 picked different dtypes on one machine from run to run.)"""
    from flexgen.device import default_dtype, dtype_name
    return dtype_name(default_dtype(torch.device("cpu")))


def matmul_flops(device, dtype, m: int, k: int, n: int) -> float:
    a = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    t = _best_time(lambda: torch.nn.functional.linear(a, w), device)
    return 2 * m * k * n / t


MATMUL_ROWS = (1, 4, 16, 64, 128, 256, 512, 1024, 4096)   # 128 and 512: common gpu batch sizes


def last_level_cache(device: torch.device) -> int:
    """Bytes of the largest cache in front of `device`'s memory (0 when unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    sizes = [0]
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except (OSError, ValueError):
            continue
    return max(sizes)


def matmul_by_rows(device, dtype, rows=MATMUL_ROWS, k: int = 4096, n: int = 8192) -> tuple:
    """((rows, flop/s), ...) of `rows` x k times k x n, as the engine runs a layer's matmuls:
    decode multiplies gpu_batch_size rows, prefill gpu_batch_size x prompt_len.

    Each timing cycles through distinct weights that together exceed the last-level cache,
    since a model's layers come from memory one after another. One weight timed over and
    over stays in a large cache and reads optimistic: on a 2-core VM showing a 480 MiB L3,
    128 rows ran at 1.39 TFLOP/s on one bf16 4096 x 8192 weight and 1.09 cycling through
    ten, while the engine's decode matmuls at that batch ran at 1.02."""
    device = torch.device(device)
    one = n * k * torch.empty((), dtype=dtype).element_size()
    count = min(16, max(2, -(-3 * last_level_cache(device) // (2 * one))))   # 1.5x the cache
    if device.type == "cpu":
        count = min(count, max(2, _host_memory() // (8 * one)))   # at most 1/8 of the host
    ws = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(count)]

    def cycle(a):
        for w in ws:
            torch.nn.functional.linear(a, w)

    out = []
    for m in rows:
        a = torch.randn(m, k, device=device, dtype=dtype)
        out.append((m, 2 * m * k * n * len(ws) / _best_time(lambda: cycle(a), device, repeat=2)))
    return tuple(out)


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes read per second by a device-to-device copy (read + write counted once each)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), device)
    return 2 * nbytes / t


def transfer_bandwidth(device, nbytes: int) -> tuple[float, float]:
    """(host->device, device->host) bytes/s. Pinned on CUDA; a plain copy on the CPU."""
    if device.type == "cpu":
        a = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
        b = torch.empty_like(a)
        t = _best_time(lambda: b.copy_(a), device)
        return nbytes / t, nbytes / t
    host = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=True).fill_(1.0)
    dev = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    t_h2d = _best_time(lambda: dev.copy_(host, non_blocking=True), device)
    t_d2h = _best_time(lambda: host.copy_(dev, non_blocking=True), device)
    return nbytes / t_h2d, nbytes / t_d2h


def attention_flops(device, dtype, rows: int, heads: int, head_dim: int, s: int, t: int) -> float:
    """flop/s of the engine's own attention (models.base.attend: fused scaled_dot_product_attention)
    for `rows` sequences: s queries over t keys (4 * s * t * hidden). Masked as the scheduler
    masks: a boolean causal mask in prefill; none in decode (s == 1), as for a gpu batch
    without padding, which lets SDPA choose the flash kernel."""
    from flexgen.models.base import attend
    h = heads * head_dim
    q = torch.randn(rows, s, h, device=device, dtype=dtype)
    k = torch.randn(t, rows, h, device=device, dtype=dtype)      # time-major, as the KV cache
    v = torch.randn(t, rows, h, device=device, dtype=dtype)
    mask = None if s == 1 else torch.ones(rows, s, t, dtype=torch.bool, device=device).tril(t - s)
    tm = _best_time(lambda: attend(q, k, v, mask, heads), device)
    return 4 * rows * s * t * heads * head_dim / tm


def packed_attention_rate(dtype, rows: int, heads: int, head_dim: int, t: int) -> float:
    """Cache values per second (K and V: 2 * rows * t * hidden) of the engine's attention
    over a 4-bit cache in host memory (kvcache.PackedAttention: fp32 tiles dequantized and
    attended, one query per row, as in decode); q in the compute dtype. A second or two."""
    from flexgen.kvcache import PackedAttention
    from flexgen.memory import MemoryTracker, Tier
    from flexgen.models.base import attend
    from flexgen.quant import CACHE_QUANT, quantize
    h = heads * head_dim
    k, v = (quantize(torch.randn(t - 1, rows, h), CACHE_QUANT) for _ in range(2))
    nk, nv = torch.randn(1, rows, h), torch.randn(1, rows, h)
    q = torch.randn(rows, 1, h).to(dtype)
    packed = PackedAttention(MemoryTracker(), t, rows, h)
    try:
        tm = _best_time(lambda: packed.attend(Tier.CPU, q, (k, v), nk, nv, None,
                                              lambda q, k, v, m: attend(q, k, v, m, heads)), torch.device("cpu"))
    finally:
        packed.close()
    return 2 * rows * t * h / tm


def profile_packed_attention_rate(hw: HardwareProfile) -> float:
    """`packed_attention_rate` at the decode shape `measure_hardware` uses, for `hw`'s
    compute device and dtype: to complete a profile measured before the figure existed."""
    k = kernel_sizes(hw.compute_device, quick=False)
    rows, t = k["decode"]
    return packed_attention_rate(DTYPES[hw.compute_dtype], rows, *k["heads"], t)


def dequant_rate(device, dtype, numel: int, group: int = 64) -> float:
    """4-bit values dequantized per second: with the engine's own `flexgen.quant` when it
    is there, else a stand-in (unpack two values per byte, scale and shift per group).

    Half the values are in the weights' layout (groups along the input dimension), half
    in the KV cache's (time-major, groups along the hidden dimension): the engine
    dequantizes both every decode step, and the cache's ran ~10 % slower here."""
    try:
        from flexgen.quant import CACHE_QUANT, WEIGHT_QUANT, dequantize, quantize
    except ImportError:
        quantize = None
    if quantize is not None:
        cols, rows = 1024, 32
        half = max(numel // 2, rows * cols)
        jobs = []
        for cfg, shape in ((WEIGHT_QUANT, (half // cols, cols)), (CACHE_QUANT, (half // (rows * cols), rows, cols))):
            packed = quantize(torch.randn(shape, device=device, dtype=torch.float32), cfg)
            # Into one reused output, as the engine does: a fresh one per call timed the page
            # faults of its memory instead (CPU, 16M values: 0.7 G values/s against 3.8).
            out = torch.empty(packed.shape, dtype=dtype, device=device)
            jobs.append((packed, out))

        def run():
            for packed, out in jobs:
                dequantize(packed, dtype, out=out)
        return sum(out.numel() for _, out in jobs) / _best_time(run, device)
    packed = torch.randint(0, 256, (numel // group, group // 2), dtype=torch.uint8, device=device)
    scale = torch.rand(numel // group, 1, device=device, dtype=torch.float16)
    mn = torch.rand(numel // group, 1, device=device, dtype=torch.float16)

    def run():
        lo = (packed & 15).to(dtype)
        hi = (packed >> 4).to(dtype)
        x = torch.stack((lo, hi), dim=-1).view(numel // group, group)
        return x * scale.to(dtype) + mn.to(dtype)

    return numel / _best_time(run, device)


def quant_rate(device, dtype, numel: int, hidden: int = 1024, rows: int = 32) -> float:
    """KV-cache values quantized per second, as the engine stores a prompt's K or V:
    `flexgen.quant` on time-major (positions, rows, hidden) values, a few positions at a
    time (kvcache.KVArray.write)."""
    from flexgen.kvcache import QUANT_CHUNK_ELEMS
    from flexgen.quant import CACHE_QUANT, quantize
    x = torch.randn(max(1, numel // (rows * hidden)), rows, hidden, device=device, dtype=dtype)
    step = max(1, QUANT_CHUNK_ELEMS // x[0].numel())

    def run():
        for t in range(0, x.shape[0], step):
            quantize(x[t:t + step], CACHE_QUANT)
    return x.numel() / _best_time(run, device)


def layer_overhead(device, dtype) -> float:
    """Seconds of a tiny attention + MLP layer: the per-step cost of launches and Python."""
    h = 64
    x = torch.randn(1, 1, h, device=device, dtype=dtype)
    w = torch.randn(h, h, device=device, dtype=dtype)
    ln_w = torch.ones(h, device=device, dtype=dtype)
    F = torch.nn.functional
    from flexgen.models.base import attend

    def run():
        for _ in range(10):
            y = F.layer_norm(x, (h,), ln_w, ln_w)
            q, k, vv = F.linear(y, w), F.linear(y, w), F.linear(y, w)
            a = attend(q, k.transpose(0, 1), vv.transpose(0, 1), None, 1)   # keys time-major, as the cache
            z = F.relu(F.linear(a + x, w))
            F.linear(z, w)

    return _best_time(run, device) / 10


def engine_layer_overhead(hw: HardwareProfile, offload_dir: Path) -> float:
    """Seconds of fixed cost per (layer, gpu batch) step of the engine itself.

    Runs the engine on a resident dummy OPT-125M with one sequence, where compute is
    tiny, and charges the decode time the cost model cannot explain (the scheduler,
    futures, cache bookkeeping, kernel launches) to each layer step.
    """
    from flexgen.engine import load_model
    from flexgen.models.registry import args_from_name
    from flexgen.optimizer.cost_model import estimate
    from flexgen.policy import Policy

    policy = Policy(gpu_batch_size=1)
    steps = 16
    with load_model("opt-125m", policy, device=hw.compute_device, dummy=True, offload_dir=offload_dir) as model:
        ids = torch.randint(10, 1000, (1, 16))
        model.generate(ids, max_new_tokens=4, eos_token_id=[])          # warm up
        model.generate(ids, max_new_tokens=steps + 1, eos_token_id=[])
        measured = model.stats.decode_time / steps
    args = args_from_name("opt-125m")
    bare = estimate(args, policy, 16, steps + 1, hw.replace(layer_overhead=0.0)).decode_time / steps
    layers = 2 * args.num_hidden_layers + 2
    return max(0.0, (measured - bare) / layers)


DISK_PROBE_BYTES = 512 << 20   # the probe file of a full profile


def disk_bandwidth(offload_dir: Path, nbytes: int = DISK_PROBE_BYTES, readers: int = LOAD_THREADS,
                   repeats: int = 3) -> tuple[float, float, str]:
    """(read, write) bytes/s in `offload_dir`, O_DIRECT when the file system allows it: the
    median of `repeats` measurements, each on a fresh file. One alone is not steady on a
    virtual disk: reading back a file just written has come out 2.1x faster than the next
    measurement on this project's virtual disk (cause not established), and a pipeline
    prediction moved with it."""
    runs = [_disk_bandwidth_once(offload_dir, nbytes, readers) for _ in range(max(1, repeats))]
    reads, writes = sorted(r for r, _, _ in runs), sorted(w for _, w, _ in runs)
    return reads[len(runs) // 2], writes[len(runs) // 2], runs[0][2]


def _disk_bandwidth_once(offload_dir: Path, nbytes: int, readers: int) -> tuple[float, float, str]:
    """One (read, write) measurement. Reads are timed as the engine issues them: `readers`
    threads (its load threads), each reading its own part of the file, since one read at a
    time leaves a virtual disk idle between requests; in READ_PIECE pieces, landing in
    turn in the two halves of a buffer, as the engine's reads fill its two working
    buffers. Reading every block into one small buffer read 1.3-1.45x faster than
    reading into memory not just read into, as the engine's reads are (this project's
    virtual disk, 8 MiB blocks: 2.5-2.8 GB/s into one buffer, 1.9 rotating over 64 MiB
    or more); writes leave the same way."""
    offload_dir.mkdir(parents=True, exist_ok=True)
    path = offload_dir / f".flexgen_profile_{os.getpid()}.bin"
    block = READ_PIECE
    nbytes = max(block, nbytes // block * block)
    buf = mmap.mmap(-1, 2 * block)           # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1 << 16) * (2 * block >> 16))
    halves = [memoryview(buf)[:block], memoryview(buf)[block:]]
    direct = getattr(os, "O_DIRECT", 0)
    note = "disk: O_DIRECT" if direct else "disk: no O_DIRECT here; buffered I/O with fsync and the file's pages dropped"
    try:
        def timed_write(flags: int) -> float:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o600)
            try:
                t0 = time.perf_counter()
                for b in range(nbytes // block):
                    os.write(fd, halves[b % 2])
                os.fsync(fd)
                return time.perf_counter() - t0
            finally:
                os.close(fd)

        try:
            write_t = timed_write(direct)
        except OSError:
            if not direct:
                raise
            direct = 0
            note = "disk: O_DIRECT unsupported here; buffered I/O with fsync and the file's pages dropped"
            write_t = timed_write(0)
        if not direct:
            fd = os.open(path, os.O_RDONLY)
            drop_cached(fd)
            os.close(fd)
        blocks = nbytes // block
        parts = [range(r * blocks // readers, (r + 1) * blocks // readers) for r in range(readers)]

        def read_part(part: range) -> None:
            fd = os.open(path, os.O_RDONLY | direct)
            mine = mmap.mmap(-1, 2 * block)
            dst = [memoryview(mine)[:block], memoryview(mine)[block:]]
            try:
                for b in part:
                    os.preadv(fd, [dst[b % 2]], b * block)
            finally:
                dst.clear()
                mine.close()
                os.close(fd)

        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(readers) as pool:
            t0 = time.perf_counter()
            list(pool.map(read_part, parts))
            read_t = time.perf_counter() - t0
    except OSError as e:
        raise FlexGenError(f"cannot measure disk bandwidth in {offload_dir}: {e}") from None
    finally:
        halves.clear()   # an mmap with views still exported cannot close
        buf.close()
        try:
            path.unlink()
        except OSError:
            pass
    return nbytes / max(read_t, 1e-9), nbytes / max(write_t, 1e-9), note


def kernel_sizes(device: str, quick: bool) -> dict:
    """The shapes the profile times on the compute device. On a GPU --quick keeps the full
    sizes: they take milliseconds there, while the small ones (a 1 GFLOP matmul is about
    2 us of an H200's work) would time kernel-launch latency instead of throughput."""
    if quick and device == "cpu":
        return {"matmul": (256, 1024, 2048), "heads": (8, 64), "prefill": (2, 128), "decode": (8, 256),
                "dequant": 1 << 20}
    return {"matmul": (1024, 2048, 8192) if device == "cpu" else (8192, 8192, 8192), "heads": (16, 128),
            "prefill": (4, 512) if device == "cpu" else (16, 512), "decode": (32, 544), "dequant": 16 << 20}


def measure_hardware(offload_dir: str | Path, quick: bool = False, device: str | None = None,
                     name: str | None = None, log=None, engine: bool = False) -> HardwareProfile:
    """Measure this machine. `device`: "cuda" or "cpu" (default: cuda when available).

    Takes about 10-30 s (a couple of seconds with `quick`). With `engine`, the per-layer
    overhead is calibrated by a short engine run on a dummy OPT-125M (off by default: on a
    busy machine that run can be dominated by thread stalls). `log(str)` gets progress lines.
    """
    log = log or (lambda s: None)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise FlexGenError(f"can only profile 'cpu' or 'cuda', not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise FlexGenError("--device cuda, but torch sees no CUDA device")
    dev = torch.device(device)
    host = torch.device("cpu")
    notes = []
    big = (64 if quick else 512) << 20

    if device == "cuda":
        from flexgen.device import prefer_expandable_segments
        prefer_expandable_segments()   # as the engine runs
        dtype_name = "float16"
        free, total = torch.cuda.mem_get_info(dev)
        gpu_mem = total
        gpu_reserved = max(0, total - free) + (512 << 20)   # context + allocator slack
        cpu_mem = _host_memory()
        desc = f"{torch.cuda.get_device_name(dev)} + {_cpu_name()} ({os.cpu_count()} cpus)"
        unified = False
    else:
        log("choosing the compute dtype")
        dtype_name = pick_cpu_dtype(quick)
        cpu_mem = gpu_mem = _host_memory()
        gpu_reserved = 0
        desc = f"{_cpu_name()} ({os.cpu_count()} cpus), no accelerator"
        unified = True
        notes.append("compute device = CPU: the gpu tier is a budget of host memory")
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)

    k = kernel_sizes(device, quick)
    log("matmul")
    mm = matmul_flops(dev, dtype, *k["matmul"])
    by_rows = ()
    if not quick:
        log("matmul by row count")
        by_rows = matmul_by_rows(dev, dtype)
    log("memory bandwidth")
    mem_bw = copy_bandwidth(dev, big)
    log("attention")
    heads, hd = k["heads"]
    rows_p, s_p = k["prefill"]
    attn_p = attention_flops(dev, dtype, rows_p, heads, hd, s_p, s_p)
    rows_d, t_d = k["decode"]
    attn_d = attention_flops(dev, dtype, rows_d, heads, hd, 1, t_d)
    log("dequantization")
    dq = dequant_rate(dev, dtype, k["dequant"])
    log("quantization")
    qr = quant_rate(dev, dtype, k["dequant"])
    log("host attention")
    if device == "cpu":
        cpu_mm, cpu_attn, cpu_dq = mm, attn_d, dq
        # The engine attends on the host in float32 (cpu_cache_compute); on a CPU machine
        # this is the compute device itself, so keep the device's numbers.
    else:
        cpu_mm = matmul_flops(host, torch.float32, 256, 1024, 2048)
        from flexgen.kvcache import HOST_ATTN_DTYPE   # what kvcache.HostAttention attends in
        cpu_attn = attention_flops(host, HOST_ATTN_DTYPE, rows_d, heads, hd, 1, t_d)
        cpu_dq = dequant_rate(host, torch.float32, (1 << 20) if quick else (8 << 20))
    log("attention over a 4-bit host cache")
    cpu_packed = packed_attention_rate(dtype, rows_d, heads, hd, t_d)
    log("host <-> device transfers")
    c2g, g2c = transfer_bandwidth(dev, big)
    log("disk")
    d_read, d_write, note = disk_bandwidth(Path(offload_dir), (32 << 20) if quick else DISK_PROBE_BYTES,
                                           repeats=1 if quick else 3)
    notes.append(note + f" in {offload_dir}")
    log("per-layer overhead")
    # Dispatch cost, timed in float32 on a CPU: tiny bf16 GEMMs take a slow path there
    # that real layer sizes do not.
    overhead = layer_overhead(dev, dtype if device == "cuda" else torch.float32)
    try:
        disk_free = shutil.disk_usage(offload_dir).free
    except OSError:
        disk_free = 0
    if quick:
        notes.append("--quick: small kernels, rough numbers")

    hw = HardwareProfile(
        name=name or f"{platform.node() or 'this machine'}-{device}",
        device=desc,
        compute_device=device,
        compute_dtype=dtype_name,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu_mem=int(gpu_mem), cpu_mem=int(cpu_mem), disk_mem=int(max(disk_free, 1)),
        gpu_reserved=int(gpu_reserved), cpu_reserved=int(min(_process_reserve(), cpu_mem // 4)),
        unified_memory=unified,
        cpu_to_gpu_bw=c2g, gpu_to_cpu_bw=g2c, disk_read_bw=d_read, disk_write_bw=d_write, disk_probe=DISK_PROBE,
        gpu_matmul_flops=mm, gpu_mem_bw=mem_bw, gpu_attn_flops_prefill=attn_p, gpu_attn_flops_decode=attn_d,
        gpu_dequant_rate=dq, gpu_quant_rate=qr, cpu_matmul_flops=cpu_mm, cpu_attn_flops=cpu_attn, cpu_dequant_rate=cpu_dq,
        cpu_packed_attn_rate=cpu_packed,
        layer_overhead=overhead, gpu_matmul_by_rows=by_rows, notes="; ".join(notes),
    )
    if engine and not quick:
        log("engine overhead per layer step")
        try:
            hw = hw.replace(layer_overhead=max(overhead, engine_layer_overhead(hw, Path(offload_dir))),
                            notes=hw.notes + "; layer_overhead calibrated on the engine (dummy OPT-125M)")
        except Exception as e:  # the engine is optional here: keep the kernel-level figure
            hw = hw.replace(notes=hw.notes + f"; engine calibration skipped ({type(e).__name__}: {e})")
    return hw


# ---------------------------------------------------------------------------------------
# `python -m flexgen profile`.

PROFILE_HELP = ("Measure this machine (compute, memory, links, disk) into a hardware profile "
                "for `flexgen policy`.")


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `python -m flexgen profile`."""
    p.add_argument("--out", help=f"where to write the profile (default {default_profile_path()})")
    p.add_argument("--offload-dir", default=str(Path(default_profile_path()).parent / "offload"),
                   help="directory on the disk that will hold offloaded tensors (its bandwidth is measured)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="compute device (default: cuda when available)")
    p.add_argument("--name", help="profile name (default: host name and device)")
    p.add_argument("--quick", action="store_true", help="small kernels, a few seconds, rough numbers")
    p.add_argument("--engine-overhead", action="store_true",
                   help="calibrate the per-layer overhead on a short engine run (dummy OPT-125M)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--network", action="store_true",
                   help="measure the link between pipeline stages (run under torchrun with 2 ranks, on one "
                        "machine or two) and store it in the profile (measured first if there is none)")


def profile_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="flexgen profile", description=PROFILE_HELP)
    add_profile_arguments(p)
    return p


def format_profile(hw: HardwareProfile) -> str:
    rows = [
        ("device", f"{hw.device} [{hw.compute_device}, {hw.compute_dtype}]"),
        ("memory", f"gpu {hw.gpu_mem / GIB:.1f} GiB (reserved {hw.gpu_reserved / GIB:.1f}), "
                   f"cpu {hw.cpu_mem / GIB:.1f} GiB (reserved {hw.cpu_reserved / GIB:.1f}), "
                   f"disk {hw.disk_mem / GIB:.0f} GiB" + (" [gpu tier is host memory]" if hw.unified_memory else "")),
        ("cpu->gpu / gpu->cpu", f"{hw.cpu_to_gpu_bw / 1e9:.2f} / {hw.gpu_to_cpu_bw / 1e9:.2f} GB/s"),
        ("disk read / write", f"{hw.disk_read_bw / 1e9:.2f} / {hw.disk_write_bw / 1e9:.2f} GB/s"),
        ("device matmul", f"{hw.gpu_matmul_flops / 1e12:.3f} TFLOP/s, memory {hw.gpu_mem_bw / 1e9:.1f} GB/s"),
        ("device attention", f"prefill {hw.gpu_attn_flops_prefill / 1e12:.3f}, decode "
                             f"{hw.gpu_attn_flops_decode / 1e12:.4f} TFLOP/s"),
        ("device dequant", f"{hw.gpu_dequant_rate / 1e9:.2f} G values/s, cache quantize "
                           + (f"{hw.gpu_quant_rate / 1e9:.2f} G values/s" if hw.gpu_quant_rate else "not measured")),
        ("host", f"matmul {hw.cpu_matmul_flops / 1e12:.3f}, attention {hw.cpu_attn_flops / 1e12:.4f} TFLOP/s, "
                 f"dequant {hw.cpu_dequant_rate / 1e9:.2f} G values/s, attention over a 4-bit cache "
                 + (f"{hw.cpu_packed_attn_rate / 1e9:.2f} G values/s" if hw.cpu_packed_attn_rate else "not measured")),
        ("per-layer overhead", f"{hw.layer_overhead * 1e6:.0f} us"),
        ("pipeline link", f"{hw.link_bw / 1e9:.2f} GB/s, {hw.link_latency * 1e6:.0f} us per message"),
        ("measured", hw.date),
    ]
    out = [f"hardware profile {hw.name!r}"] + [f"  {k:<20} {v}" for k, v in rows]
    if hw.notes:
        out.append(f"  {'notes':<20} {hw.notes}")
    return "\n".join(out)


def profile_main(argv: list[str]) -> int:
    return profile_run(profile_parser().parse_args(argv))


def profile_run(args) -> int:
    """`python -m flexgen profile` with parsed flags."""
    from flexgen.outputs import check_writable, write_atomic
    out = check_writable(args.out or default_profile_path(), "profile")  # before minutes of measuring
    try:
        Path(args.offload_dir).expanduser().mkdir(parents=True, exist_ok=True)
        check_writable(Path(args.offload_dir).expanduser() / "probe", "into --offload-dir")
    except OSError as e:
        raise FlexGenError(f"cannot use --offload-dir {args.offload_dir}: {e.strerror}") from None
    log = (lambda s: print(f"measuring {s} ...", file=sys.stderr)) if not args.json else None
    link = None
    if args.network:
        import torch

        from flexgen import pipeline
        if pipeline.world_size() < 2:
            raise FlexGenError("--network measures the link between two ranks: run it as "
                               "`torchrun --nproc-per-node 2 -m flexgen profile --network` (or with --nnodes 2)")
        pipeline.init_process_group(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        link = pipeline.measure_link()
        if pipeline.rank() != 0:
            return 0
    if link is not None and out.exists():
        hw = HardwareProfile.load(out)
    else:
        hw = measure_hardware(args.offload_dir, quick=args.quick, device=args.device, name=args.name, log=log,
                              engine=args.engine_overhead)
    if link is not None:
        hw = hw.replace(link_bw=link[0], link_latency=link[1])
    write_atomic(out, json.dumps(hw.to_dict(), indent=2) + "\n", "profile")
    if args.json:
        print(json.dumps(hw.to_dict()))
    else:
        print(format_profile(hw))
        print(f"wrote {out}")
    return 0
