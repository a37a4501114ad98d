"""Matmul rate by row count: one weight timed over and over vs distinct weights in turn.

    python benchmarks/bench_matmul_cache.py [--device cpu] [--dtype bfloat16] [--weights 10]

A model's layers reach the compute device from memory one after another; a single weight
timed in a loop can stay in a large last-level cache and read faster than any layer runs.
The hardware profile (flexgen.calibrate.matmul_by_rows) times the second way; this prints
both, so the difference on a machine can be checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexgen.calibrate import _best_time, last_level_cache  # noqa: E402
from flexgen.device import DTYPES  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--weights", type=int, default=10, help="distinct weights cycled through")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 128, 256, 512, 1024, 4096])
    a = ap.parse_args()
    dev, dt = torch.device(a.device), DTYPES[a.dtype]
    ws = [torch.randn(a.n, a.k, device=dev, dtype=dt) for _ in range(a.weights)]
    mib = a.n * a.k * ws[0].element_size() >> 20
    print(f"{a.k} x {a.n} {a.dtype} weights ({mib} MiB each, {a.weights} of them); "
          f"last-level cache {last_level_cache(dev) >> 20} MiB")
    print("| rows | one weight, GFLOP/s | distinct weights, GFLOP/s | one / distinct |")
    print("|---|---|---|---|")
    F = torch.nn.functional
    for m in a.rows:
        x = torch.randn(m, a.k, device=dev, dtype=dt)
        flops = 2 * m * a.k * a.n

        def cycle():
            for w in ws:
                F.linear(x, w)
        warm = flops / _best_time(lambda: F.linear(x, ws[0]), dev, repeat=5)
        cold = flops * len(ws) / _best_time(cycle, dev, repeat=3)
        print(f"| {m} | {warm / 1e9:.1f} | {cold / 1e9:.1f} | {warm / cold:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
