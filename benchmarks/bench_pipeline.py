"""1 vs N pipeline stages (torchrun, gloo on the CPU or nccl on GPUs) against the pipeline
cost model.

    python benchmarks/bench_pipeline.py [--stages 1 2] [--device cpu] [--profile FILE]

Each run is `torchrun --nproc-per-node N -m flexgen ...` with one torch thread per rank
on the CPU; the single-stage run is the plain CLI. Weights mostly on disk by default, so
on one machine every stage reads the same disk: that disk is the shared bottleneck and
bounds what more stages can gain. Prints a markdown table of measured and predicted
throughput and each stage's compute / I/O wait / receive wait / send time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexgen import Policy  # noqa: E402
from flexgen.models.registry import args_from_name  # noqa: E402
from flexgen.calibrate import disk_bandwidth, measure_hardware  # noqa: E402
from flexgen.optimizer import HardwareProfile  # noqa: E402
from flexgen.optimizer.pipeline import estimate_pipeline  # noqa: E402


def run(n: int, a, offload: Path, out: Path) -> dict:
    flags = ["--model", a.model, "--dummy", "--percent", *map(str, a.percent), "--gpu-batch-size", str(a.gbs),
             "--num-gpu-batches", str(a.ngb), "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len),
             "--device", a.device, "--offload-dir", str(offload), "--quiet", "--json-out", str(out)]
    if a.dtype:
        flags += ["--dtype", a.dtype]
    launch = [sys.executable, "-m", "flexgen"] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "-m", "flexgen"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    subprocess.run(launch + flags, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--percent", type=float, nargs=6, default=[0, 20, 100, 0, 100, 0])
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--ngb", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", help="hardware profile JSON (default: measured now with --threads threads)")
    ap.add_argument("--link-bw", type=float, default=1.0, help="GB/s between stages (gloo on loopback: ~1)")
    ap.add_argument("--link-latency", type=float, default=100.0, help="us per message")
    ap.add_argument("--profile-disk", action="store_true",
                    help="predict with the profile's disk figure instead of one measured before each run")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(dir=os.environ.get("FLEXGEN_OFFLOAD_DIR")) as tmp:
        tmp = Path(tmp)
        hw = HardwareProfile.load(a.profile) if a.profile else measure_hardware(tmp / "probe", device=a.device)
        args = args_from_name(a.model)
        policy = Policy.from_percent(a.percent, gpu_batch_size=a.gbs, num_gpu_batches=a.ngb)
        print(f"{a.model} dummy, policy {' '.join(f'{v:g}' for v in a.percent)}, block {a.gbs} x {a.ngb}, "
              f"prompt {a.prompt_len}, gen {a.gen_len}, {a.threads} thread(s) per rank, device {a.device}")
        # The prediction is only as steady as these: print them with every table.
        print(f"profile: matmul {hw.gpu_matmul_flops / 1e9:.0f} GFLOP/s, memory {hw.gpu_mem_bw / 1e9:.1f} GB/s, "
              f"disk read {hw.disk_read_bw / 1e9:.2f} GB/s, write {hw.disk_write_bw / 1e9:.2f} GB/s, "
              f"per-layer overhead {hw.layer_overhead * 1e6:.0f} us\n")
        print("| stages | disk read GB/s (before / after) | measured token/s | predicted token/s | measured / predicted | "
              "per stage: layers, compute / I/O wait / recv wait / send (s) |")
        print("|---|---|---|---|---|---|")
        for n in a.stages:
            run_hw = hw
            probe = not a.profile_disk and a.percent[0] + a.percent[1] < 100
            # This virtual disk's read rate moves by more than 25 % between runs minutes
            # apart (two probes a minute apart read 1.69 and 1.29 GB/s), so measure it
            # just before and just after the run and predict with the mean, with as many
            # readers as the run keeps in flight: with only weights on disk, one per rank
            # (a rank reads its layers one at a time).
            reads = [disk_bandwidth(tmp / "probe", readers=n)[0]] if probe else []
            r = run(n, a, tmp / "offload", tmp / f"r{n}.json")
            if probe:
                reads.append(disk_bandwidth(tmp / "probe", readers=n)[0])
                run_hw = dataclasses.replace(hw, disk_read_bw=sum(reads) / len(reads))
            # Every rank runs on this machine: they share its disk.
            pe = estimate_pipeline(args, [policy], a.prompt_len, a.gen_len, run_hw, n, link_bw=a.link_bw * 1e9,
                                   link_latency=a.link_latency * 1e-6, hosts=[0] * n)
            meas = r["total_throughput_tok_s"]
            if n == 1:
                t = r["timings_s"]
                stages = (f"all: {t.get('prefill.compute', 0) + t.get('decode.compute', 0):.2f} / "
                          f"{t.get('prefill.wait', 0) + t.get('decode.wait', 0):.2f} / - / -")
            else:
                stages = "; ".join(f"{s['layers'][0]}-{s['layers'][1] - 1}: {s['compute_s']:.2f} / "
                                   f"{s['io_wait_s']:.2f} / {s['recv_wait_s']:.2f} / {s['send_s']:.2f}"
                                   for s in r["stages"])
            disk = " / ".join(f"{x / 1e9:.2f}" for x in reads) if reads else f"{hw.disk_read_bw / 1e9:.2f}"
            print(f"| {n} | {disk} | {meas:.2f} | {pe.throughput:.2f} | "
                  f"{meas / pe.throughput:.2f} | {stages} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
