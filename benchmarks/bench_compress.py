"""4-bit weights against 16-bit weights, both on disk, same workload, one run.

A dummy OPT (default 1.3B) with every weight on the disk tier (O_DIRECT reads), the KV
cache and activations in memory. Prints throughput, bytes read from disk and the ratios.

    python benchmarks/bench_compress.py [--model opt-1.3b] [--batch 8] [--prompt-len 128] [--gen-len 8]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time

import torch

import flexgen
from flexgen import Policy
from flexgen.device import default_dtype


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=8)
    a = ap.parse_args()
    dtype = default_dtype(torch.device("cpu"))
    off = tempfile.mkdtemp(prefix="flexgen-bench-", dir=os.getcwd())
    ids = torch.randint(4, 50000, (a.batch, a.prompt_len), generator=torch.Generator().manual_seed(0))
    print(f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"dtype {str(dtype).removeprefix('torch.')}; {a.model}, batch {a.batch}, prompt {a.prompt_len}, "
          f"gen {a.gen_len}, weights 100% on disk")
    rows = []
    try:
        for compress in (False, True):
            p = Policy(gpu_batch_size=a.batch, w_gpu_percent=0, w_cpu_percent=0, compress_weight=compress)
            with flexgen.load_model(a.model, p, device="cpu", dtype=dtype, offload_dir=off, dummy=True) as m:
                t0 = time.perf_counter()
                m.generate(ids, max_new_tokens=a.gen_len, eos_token_id=[])
                t = time.perf_counter() - t0
                rows.append((compress, t, m.stats, m.placement.weight_bytes()["disk"]))
    finally:
        shutil.rmtree(off, ignore_errors=True)
    n = a.batch * a.gen_len
    print("\n| weights | on disk | read from disk | wall time (s) | token/s | disk reads |")
    print("|---|---|---|---|---|---|")
    for compress, t, s, held in rows:
        print(f"| {'4-bit' if compress else '16-bit'} | {held / 2**20:.0f} MiB | {s.disk_read_bytes / 2**20:.0f} MiB "
              f"| {t:.2f} | {n / t:.2f} | {'O_DIRECT' if s.direct_io else 'buffered'} |")
    (_, t16, s16, _), (_, t4, s4, _) = rows
    print(f"\n4-bit / 16-bit: throughput {t16 / t4:.2f}x, bytes read {s4.disk_read_bytes / s16.disk_read_bytes:.3f}")


if __name__ == "__main__":
    main()
