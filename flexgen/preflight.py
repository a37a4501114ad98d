"""Before anything is allocated: does this policy fit the machine's memory and disk?

Allocating until the OOM killer ends the process (or an allocator raises mid-placement)
wastes the user's time and tells them nothing. The cost model already knows the peak
bytes a policy holds on each tier; compare them with what the machine has now.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from flexgen.device import dtype_name
from flexgen.errors import FlexGenError
from flexgen.models.opt import ModelArgs
from flexgen.policy import Policy
from flexgen.units import GIB

_HINT = ("try --percent with less on gpu/cpu (the rest goes to disk), a smaller --gpu-batch-size, "
         "--compress-weight, or --gpu-mem/--cpu-mem budgets to choose a policy that fits")


@dataclass(frozen=True)
class Needs:
    """Peak bytes a run holds: per tier, and in host memory (where the gpu tier is on a CPU)."""
    gpu: float
    cpu: float
    disk: float
    host: float
    weights: dict


def needs(args: ModelArgs, policy: Policy, prompt_len: int, gen_len: int, device_type: str,
          dtype: torch.dtype, store_bytes=None) -> Needs:
    """store_bytes: None for dummy weights (their disk part is written with the run's files),
    else the bytes of the weight store still to be written (0 when it exists)."""
    from flexgen.optimizer.cost_model import estimate
    from flexgen.optimizer.hardware import HardwareProfile

    # Only memory is read from the estimate: the timing figures of the profile do not matter.
    hw = HardwareProfile(name="this machine", device=device_type, compute_device=device_type,
                         compute_dtype=dtype_name(dtype), unified_memory=device_type != "cuda")
    est = estimate(args, policy, prompt_len, gen_len, hw)
    phases = est.memory_breakdown.values()
    in_store = store_bytes is not None  # disk-tier weights are read from the store in place
    disk = max(sum(v for k, v in p["disk"].items() if not (k == "weights" and in_store))
               for p in phases) + (store_bytes or 0)
    host = max(p["cpu"] if device_type == "cuda" else p["gpu"] + p["cpu"]
               for p in est.memory_by_phase.values())
    weights = {t: est.memory_breakdown["prefill"][t]["weights"] for t in ("gpu", "cpu", "disk")}
    return Needs(est.memory["gpu"], est.memory["cpu"], disk, host, weights)


def host_available() -> int:
    """Host memory a new allocation can get now (MemAvailable), within a cgroup limit if lower."""
    from flexgen.autopolicy import available_memory
    avail = available_memory()
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            lim = Path(limit).read_text().strip()
            if lim != "max" and int(lim) < 1 << 60:
                avail = min(avail, int(lim) - int(Path(usage).read_text()))
            break
        except (OSError, ValueError):
            continue
    return max(avail, 0)


def disk_free(path: Path) -> int:
    p = Path(path)
    probe = p if p.exists() else next((q for q in p.parents if q.exists()), Path("/"))
    return shutil.disk_usage(probe).free


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check(args: ModelArgs, policy: Policy, prompt_len: int, gen_len: int, device, dtype: torch.dtype,
          offload_dir: Path, store_bytes=None) -> Needs:
    """Raise FlexGenError (one line) when the policy cannot fit; `device` is a ComputeDevice."""
    n = needs(args, policy, prompt_len, gen_len, device.device.type, dtype, store_bytes)
    what = f"{args.name}, block {policy.gpu_batch_size} x {policy.num_gpu_batches}, prompt {prompt_len} + {gen_len}"
    have = host_available()
    if n.host > have:
        tiers = "cpu tier" if device.is_cuda else "gpu and cpu tiers"
        raise FlexGenError(f"needs {_gib(n.host)} of host memory for this policy ({what}; {tiers}, of which "
                           f"weights {_gib(n.weights['cpu'] + (0 if device.is_cuda else n.weights['gpu']))}), "
                           f"{_gib(have)} available; {_HINT}")
    if device.is_cuda:
        free, _ = torch.cuda.mem_get_info(device.device)
        if n.gpu > free:
            raise FlexGenError(f"needs {_gib(n.gpu)} of GPU memory for this policy ({what}; weights "
                               f"{_gib(n.weights['gpu'])}), {_gib(free)} free on {device.device}; {_HINT}")
    free = disk_free(offload_dir)
    if n.disk > free:
        raise FlexGenError(f"needs {_gib(n.disk)} of disk in {offload_dir} for this policy ({what}), "
                           f"{_gib(free)} free; use another --offload-dir or keep more in memory")
    return n
