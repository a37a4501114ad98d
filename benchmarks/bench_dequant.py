"""Dequantization throughput (GB/s of output) for a weight-like and a cache-like tensor.

    python -m benchmarks.bench_dequant [--device cpu] [--repeat 10]

(or `PYTHONPATH=. python benchmarks/bench_dequant.py` from the repo root).

"fresh" allocates the output on every call (as `dequantize(p)` does); "out=" reuses one
buffer (as an engine workspace would). On the CPU the gap between them is page faults.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from flexgen.quant import CACHE_QUANT, WEIGHT_QUANT, dequantize, quantize

CASES = {
    "weight (8192, 2048) gd=0": ((8192, 2048), WEIGHT_QUANT),
    "cache (512, 32, 2048) gd=-1": ((512, 32, 2048), CACHE_QUANT),
}


def _best_seconds(fn, repeat: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up: allocator, first-touch pages, kernels
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"{'tensor':<30}{'out dtype':<11}{'fresh GB/s':>11}{'out= GB/s':>11}{'quantize GB/s in':>18}")
    gen = torch.Generator().manual_seed(0)
    for name, (shape, cfg) in CASES.items():
        x = torch.randn(shape, generator=gen).to(device)
        q_s = _best_seconds(lambda: quantize(x, cfg), args.repeat, device)
        p = quantize(x, cfg)
        for dtype in (torch.bfloat16, torch.float32):
            nbytes = x.numel() * dtype.itemsize
            fresh = _best_seconds(lambda: dequantize(p, dtype), args.repeat, device)
            buf = torch.empty(shape, dtype=dtype, device=device)
            reuse = _best_seconds(lambda: dequantize(p, out=buf), args.repeat, device)
            print(f"{name:<30}{str(dtype).removeprefix('torch.'):<11}"
                  f"{nbytes / fresh / 1e9:>11.2f}{nbytes / reuse / 1e9:>11.2f}"
                  f"{x.numel() * 4 / q_s / 1e9:>18.2f}")


if __name__ == "__main__":
    main()
