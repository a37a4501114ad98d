"""The automatic policy: the one path by which the CLI's --gpu-mem and `flexgen.LLM`
choose a policy for memory budgets on this machine.

Budgets left out come from this machine: host memory available now, free disk under the
offload directory, and (for the gpu tier of a CUDA device) the device's free memory.
Outside the optimizer package because it measures the machine (flexgen.calibrate) when
no profile is cached, and plans in the dtype the engine will compute in.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from flexgen.errors import FlexGenError
from flexgen.models.base import ModelArgs
from flexgen.optimizer.cost_model import Estimate
from flexgen.optimizer.hardware import DISK_PROBE, GIB, HardwareProfile, default_profile_path, load_hardware
from flexgen.policy import Policy


def available_memory() -> int:
    """Bytes of host memory available now (MemAvailable), else the physical total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_disk(offload_dir: Path) -> int:
    """Free bytes on the file system that holds (or will hold) `offload_dir`."""
    probe = offload_dir if offload_dir.exists() else next((q for q in offload_dir.parents if q.exists()), Path("/"))
    return shutil.disk_usage(probe).free


def hardware_profile(hardware, offload_dir: Path, log: Callable[[str], None]) -> HardwareProfile:
    """A named/bundled profile or JSON file; else this machine's, measured once and cached."""
    if hardware is not None:
        return load_hardware(hardware)
    if default_profile_path().is_file():
        # A profile cached by an older version is completed, not measured again whole
        # (seconds, keeping the rest: it may hold an engine calibration).
        hw = original = load_hardware(None)
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if hw.disk_probe < DISK_PROBE:
            # An older probe's disk figures read too fast: measure the disk again.
            from flexgen.calibrate import disk_bandwidth
            log(f"re-measuring the disk for {default_profile_path()}: its figures came from an older probe ...")
            read, write, _ = disk_bandwidth(offload_dir)
            hw = hw.replace(disk_read_bw=read, disk_write_bw=write, disk_probe=DISK_PROBE,
                            notes=f"{hw.notes}; disk re-measured {when} (newer probe)".lstrip("; "))
        if not hw.cpu_packed_attn_rate:
            from flexgen.calibrate import profile_packed_attention_rate
            log(f"measuring attention over a 4-bit host cache for {default_profile_path()} ...")
            hw = hw.replace(cpu_packed_attn_rate=profile_packed_attention_rate(hw),
                            notes=f"{hw.notes}; 4-bit host attention measured {when}".lstrip("; "))
        if hw is not original:
            hw.save(default_profile_path())
        return hw
    from flexgen.calibrate import measure_hardware
    log(f"measuring this machine once (saved to {default_profile_path()}; "
        "`python -m flexgen profile` re-measures) ...")
    hw = measure_hardware(offload_dir)
    default_profile_path().parent.mkdir(parents=True, exist_ok=True)
    hw.save(default_profile_path())
    return hw


class Choice(NamedTuple):
    policy: Policy
    estimate: Estimate
    shrunk: bool = False   # the block was shrunk to num_prompts: a larger batch deserves a new choice


def choose_policy(model_args: ModelArgs, prompt_len: int, gen_len: int, *, offload_dir: Path,
                  gpu_mem: Optional[float] = None, cpu_mem: Optional[float] = None,
                  disk_mem: Optional[float] = None, hardware=None, device=None, dtype=None,
                  compress_weight: bool = False,
                  compress_cache: bool = False, cpu_cache_compute: Optional[bool] = None, overlap: bool = True,
                  gpu_batch_size: Optional[int] = None, num_gpu_batches: Optional[int] = None,
                  num_prompts: Optional[int] = None, default_budgets: bool = False,
                  log: Optional[Callable[[str], None]] = None) -> Choice:
    """The optimizer's policy for budgets given in GiB (cpu/disk None: this machine's).

    gpu_mem is required unless `default_budgets`: then `default_gpu_mem` gives it (and on
    a CPU device the cpu tier gets as much). With `num_prompts`, a block larger than that
    many sequences is shrunk to it (padding rows would only cost time).

    Under torchrun (world size > 1) the budgets are this rank's: every rank calls this
    together, rank 0 plans the whole pipeline (`optimizer.pipeline.plan_for_ranks`) and
    each rank gets its own stage's policy; the estimate is that stage's, with the
    pipeline's predicted throughput."""
    from flexgen.optimizer.solver import search

    log = log or (lambda msg: print(msg, file=sys.stderr))
    for name, v in (("gpu_mem", gpu_mem), ("cpu_mem", cpu_mem), ("disk_mem", disk_mem)):
        if v is not None and not v >= 0:
            raise FlexGenError(f"--{name.replace('_', '-')} must be a size in GiB >= 0, got {v}")
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if gpu_mem is None and default_budgets:
        gpu_mem = default_gpu_mem(dev)
        if cpu_mem is None and dev.type == "cpu":
            cpu_mem = gpu_mem
    if gpu_mem is None:
        raise FlexGenError("choosing a policy needs a gpu memory budget (GiB of accelerator memory; on a "
                           "CPU-only machine, the part of host memory that plays the gpu tier)")
    hw = hardware_profile(hardware, offload_dir, log)
    from flexgen.device import default_dtype, dtype_name
    # Plan with the bytes per value the engine will compute in, not the profile's.
    hw = hw.for_engine(dtype_name(dtype) if dtype else dtype_name(default_dtype(dev)))
    if gpu_mem is not None and hw.gpu_reserved and gpu_mem * GIB <= hw.gpu_reserved:
        log(f"flexgen: warning: --gpu-mem {gpu_mem:g} leaves nothing for tensors: the hardware profile "
            f"reserves {hw.gpu_reserved / GIB:.1f} GiB of gpu memory (CUDA context, allocator slack)")
    host = max(0, hw.cpu_mem - hw.cpu_reserved)
    if cpu_mem is not None and cpu_mem * GIB > host:
        log(f"flexgen: warning: --cpu-mem {cpu_mem:g} is more than this machine has for tensors: "
            f"{host / GIB:.1f} GiB of {hw.cpu_mem / GIB:.1f} GiB once the process itself "
            f"({hw.cpu_reserved / GIB:.1f} GiB) is counted; planning with {host / GIB:.1f} GiB")
    cpu = cpu_mem * GIB if cpu_mem is not None else available_memory()
    disk = disk_mem * GIB if disk_mem is not None else free_disk(offload_dir)
    from flexgen import pipeline
    if pipeline.world_size() > 1:
        # Under torchrun: this rank's stage of the plan all ranks choose together.
        from flexgen.optimizer.pipeline import format_pipeline, plan_for_ranks
        plan = plan_for_ranks(model_args, prompt_len, gen_len, hw, dev, gpu_mem * GIB, cpu, disk,
                              allow_compress_weight=compress_weight, allow_compress_cache=compress_cache,
                              cpu_cache_compute=cpu_cache_compute, overlap=overlap,
                              gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches)
        stage = plan.estimate.stages[pipeline.rank()]
        if pipeline.rank() == 0:
            log(format_pipeline(plan.estimate, f"flexgen: pipeline plan for {model_args.name} ({hw.name}), "
                                f"prompt {prompt_len} + {gen_len}"))
        # This stage's whole-block estimate (its memory), with the pipeline's throughput.
        return Choice(stage.policy, dataclasses.replace(stage.block_estimate, throughput=plan.estimate.throughput))
    kw = dict(gpu_mem=gpu_mem * GIB, cpu_mem=cpu, disk_mem=disk, allow_compress_weight=compress_weight,
              allow_compress_cache=compress_cache, cpu_cache_compute=cpu_cache_compute, overlap=overlap)
    policy, est = search(model_args, prompt_len, gen_len, hw, gpu_batch_size=gpu_batch_size,
                         num_gpu_batches=num_gpu_batches, **kw)
    if num_prompts is None or policy.block_size <= num_prompts:
        return Choice(policy, est)
    gbs = min(policy.gpu_batch_size, num_prompts)
    policy, est = search(model_args, prompt_len, gen_len, hw, gpu_batch_size=gbs,
                         num_gpu_batches=-(-num_prompts // gbs), **kw)
    return Choice(policy, est, shrunk=True)


def default_gpu_mem(device) -> float:
    """GiB for the gpu tier when the user gives none: the CUDA device's free memory, or on
    a CPU device half of the host memory available now (the other half stays the cpu tier)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free / GIB
    return available_memory() / 2 / GIB
