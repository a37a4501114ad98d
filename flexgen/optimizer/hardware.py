"""Hardware profiles: what the cost model knows about a machine.

A profile is a typed, frozen record of memory sizes, link bandwidths (one number per
direction), and compute throughput on the compute device ("gpu" tier) and on the host.
Units are SI base units throughout: bytes, bytes/s, flop/s, values/s, seconds.

Profiles are JSON files. `load_hardware("t4")` returns the bundled profile of the FlexGen
paper's machine (GCP, NVIDIA T4 16 GB, 208 GB DRAM, 1.5 TB local SSD);
`python -m flexgen profile` measures this machine (see `measure.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from flexgen.errors import FlexGenError
from flexgen.units import GIB

COMPUTE_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4}
COMPUTE_DEVICES = ("cuda", "cpu", "mps")

# Fields that must be positive numbers (the rest: strings, bools, non-negative reserves).
_POSITIVE = (
    "gpu_mem", "cpu_mem", "disk_mem",
    "cpu_to_gpu_bw", "gpu_to_cpu_bw", "disk_read_bw", "disk_write_bw",
    "gpu_matmul_flops", "gpu_mem_bw", "gpu_attn_flops_prefill", "gpu_attn_flops_decode",
    "gpu_dequant_rate", "cpu_matmul_flops", "cpu_attn_flops", "cpu_dequant_rate", "link_bw",
)
_NON_NEGATIVE = ("gpu_reserved", "cpu_reserved", "layer_overhead", "link_latency", "gpu_quant_rate", "disk_probe",
                 "cpu_packed_attn_rate")

# The disk probe of `flexgen profile` (calibrate.disk_bandwidth): 1 reads as the engine does,
# into working buffers. Profiles with 0 were measured by reading every block into one small
# buffer, which timed a virtual disk 1.3-1.45x faster than the engine reads it.
DISK_PROBE = 1


@dataclass(frozen=True)
class HardwareProfile:
    """One machine as the cost model sees it.

    The "gpu" tier is the compute device's memory; on a CPU-only machine it is a budgeted
    region of host memory (`unified_memory`), and cpu<->gpu "transfers" are memory copies.
    """

    name: str
    device: str                      # human-readable description (GPU / CPU model)
    compute_device: str = "cuda"     # "cuda" | "cpu" | "mps"
    compute_dtype: str = "float16"   # dtype of working buffers and matmuls on the compute device
    date: str = ""                   # when measured or fitted (ISO 8601)

    # Capacities (bytes).
    gpu_mem: int = 16 * GIB
    cpu_mem: int = 208 * GIB
    disk_mem: int = 1500 * GIB
    gpu_reserved: int = 0            # not usable by tensors: CUDA context, allocator slack
    cpu_reserved: int = 0            # the process itself: Python, torch, page-cache headroom
    unified_memory: bool = False     # gpu tier lives in host memory (CPU / Apple machines)

    # Links (bytes/s), one number per direction.
    cpu_to_gpu_bw: float = 12e9
    gpu_to_cpu_bw: float = 12e9
    disk_read_bw: float = 2e9        # disk -> cpu, O_DIRECT (not the page cache)
    disk_write_bw: float = 1e9       # cpu -> disk
    disk_probe: int = 0              # which probe measured the two disk figures (DISK_PROBE: current)

    # Compute device.
    gpu_matmul_flops: float = 20e12       # large matmuls (prefill)
    gpu_mem_bw: float = 200e9             # device memory bandwidth: bounds small-batch matmuls
    gpu_attn_flops_prefill: float = 10e12  # batched matmul of attention, prefill
    gpu_attn_flops_decode: float = 0.1e12  # attention over the cache, one query per row
    gpu_dequant_rate: float = 10e9         # 4-bit values dequantized per second
    # KV-cache values quantized per second as the engine stores them (prompt K/V, then one
    # position a step). 0: not measured (profiles from before it was): the dequant rate
    # stands in, though on a 2-core CPU quantizing ran at 0.42 G values/s, dequantizing 0.7-1.2.
    gpu_quant_rate: float = 0.0

    # Host.
    cpu_matmul_flops: float = 1e12
    cpu_attn_flops: float = 0.01e12        # attention over the cache on the host (cpu_cache_compute)
    cpu_dequant_rate: float = 1e9
    # KV-cache values (K and V: one per row, position and channel) per second of attention
    # over a 4-bit cache in host memory, dequantization included (kvcache.PackedAttention):
    # every compressed row that attends on the host, which on a CPU compute device is all
    # of them. 0: not measured (profiles from before it was): the dequant and attention
    # rates stand in.
    cpu_packed_attn_rate: float = 0.0

    layer_overhead: float = 0.0            # fixed seconds per (layer, gpu batch) step: launches, Python

    # Matmul rate by row count, measured: ((rows, flop/s), ...) of a (rows x k) @ (k x n)
    # product whose k x n weights come from memory. When given, the cost model prices a
    # layer's matmuls at the rate for its rows (weight reads included) instead of
    # gpu_matmul_flops + gpu_mem_bw: on a CPU a 64-row matmul ran at 0.8 of a 1024-row one.
    # Empty (older and fitted profiles): the two-term model.
    gpu_matmul_by_rows: tuple = ()

    # Between pipeline stages (torchrun ranks): `flexgen profile --network`, or given.
    link_bw: float = 10e9                  # bytes/s
    link_latency: float = 20e-6            # seconds per message
    notes: str = ""

    def __post_init__(self):
        if self.compute_device not in COMPUTE_DEVICES:
            raise FlexGenError(f"hardware profile {self.name!r}: compute_device must be one of "
                               f"{', '.join(COMPUTE_DEVICES)}, got {self.compute_device!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise FlexGenError(f"hardware profile {self.name!r}: compute_dtype must be one of "
                               f"{', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        for f in _POSITIVE:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise FlexGenError(f"hardware profile {self.name!r}: {f} must be a positive number, got {v!r}")
        for f in _NON_NEGATIVE:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise FlexGenError(f"hardware profile {self.name!r}: {f} must be >= 0, got {v!r}")
        for f in ("gpu_mem", "cpu_mem", "disk_mem", "gpu_reserved", "cpu_reserved"):
            object.__setattr__(self, f, int(getattr(self, f)))
        try:
            table = tuple(sorted((int(r), float(v)) for r, v in self.gpu_matmul_by_rows))
        except (TypeError, ValueError):
            table = None
        if table is None or any(r < 1 or not math.isfinite(v) or v <= 0 for r, v in table) \
                or len({r for r, _ in table}) != len(table):
            raise FlexGenError(f"hardware profile {self.name!r}: gpu_matmul_by_rows must be [rows, flop/s] pairs "
                               f"with distinct rows >= 1 and positive rates, got {self.gpu_matmul_by_rows!r}")
        object.__setattr__(self, "gpu_matmul_by_rows", table)

    @property
    def cache_quant_rate(self) -> float:
        return self.gpu_quant_rate or self.gpu_dequant_rate

    def matmul_time(self, rows: float, params: float) -> float:
        """Seconds to multiply `rows` rows by `params` weights read from device memory: at
        the measured rate for that many rows, else one rate plus the weight read."""
        if self.gpu_matmul_by_rows:
            return 2 * rows * params / self.matmul_rate(rows)
        return 2 * rows * params / self.gpu_matmul_flops + params * self.dtype_bytes / self.gpu_mem_bw

    def matmul_rate(self, rows: float) -> float:
        """flop/s of a matmul with `rows` rows: gpu_matmul_by_rows interpolated in log rows;
        below its first point the time stays that point's (reading the weights bounds it),
        above its last the rate stays the last one; gpu_matmul_flops without a table."""
        t = self.gpu_matmul_by_rows
        if not t:
            return self.gpu_matmul_flops
        if rows <= t[0][0]:
            return t[0][1] * rows / t[0][0]
        for (r0, v0), (r1, v1) in zip(t, t[1:]):
            if rows <= r1:
                w = math.log(rows / r0) / math.log(r1 / r0)
                return v0 + w * (v1 - v0)
        return t[-1][1]

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of working buffers on the compute device."""
        return COMPUTE_DTYPES[self.compute_dtype]

    def for_engine(self, dtype: str | None = None) -> "HardwareProfile":
        """This profile with the compute dtype a run will use (`dtype`, else the engine's
        default on this kind of device): bytes per value must be the engine's."""
        if dtype is None:
            if self.compute_device == "cpu":
                from flexgen.device import cpu_has_bf16
                dtype = "bfloat16" if cpu_has_bf16() else "float32"
            else:
                dtype = "float16"
        return self if dtype == self.compute_dtype else self.replace(compute_dtype=dtype)

    def replace(self, **changes) -> "HardwareProfile":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "hardware profile") -> "HardwareProfile":
        if not isinstance(d, dict):
            raise FlexGenError(f"{source}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise FlexGenError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
        missing = {"name", "device"} - set(d)
        if missing:
            raise FlexGenError(f"{source}: missing field(s) {', '.join(sorted(missing))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise FlexGenError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "HardwareProfile":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FlexGenError(f"hardware profile not found: {path}") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FlexGenError(f"cannot read hardware profile {path}: {e}") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> Path:
        from flexgen.outputs import write_atomic
        return write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n", "hardware profile")


# ---------------------------------------------------------------------------------------
# Where profiles live.

BUNDLED_DIR = Path(__file__).resolve().parent / "profiles"   # shipped with the package


def bundled_profile_path(name: str) -> Path | None:
    p = BUNDLED_DIR / f"hardware_{name}.json"
    return p if p.is_file() else None


def default_profile_path() -> Path:
    """Where `flexgen profile` writes by default: $XDG_CACHE_HOME/flexgen/hardware.json."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flexgen" / "hardware.json"


def load_hardware(name_or_path: str | Path | None = None) -> HardwareProfile:
    """A profile by bundled name ("t4"), by file path, or (None) the measured default.

    None reads `default_profile_path()` and raises FlexGenError telling the user to run
    `python -m flexgen profile` (or pass `--hardware t4`) when it does not exist.
    """
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    if name_or_path is None:
        p = default_profile_path()
        if not p.is_file():
            raise FlexGenError(f"no hardware profile at {p}: run `python -m flexgen profile` to measure "
                               "this machine, or pass --hardware t4 (the paper's machine) or a JSON file")
        return HardwareProfile.load(p)
    s = str(name_or_path)
    if not Path(s).is_file() and os.sep not in s and not s.endswith(".json"):
        p = bundled_profile_path(s.lower())
        if p is None:
            names = sorted(q.stem[len("hardware_"):] for q in BUNDLED_DIR.glob("hardware_*.json"))
            raise FlexGenError(f"unknown hardware profile {s!r}; bundled: {', '.join(names) or 'none'} "
                               "(or give a JSON file path)")
        return HardwareProfile.load(p)
    return HardwareProfile.load(s)
