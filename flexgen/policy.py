"""The offloading policy: where weights, KV cache and activations live, and the block size.

Field names follow the original FlexGen so existing policies and habits carry over.
Each `*_gpu_percent` / `*_cpu_percent` pair gives the share on the accelerator and in
host memory; disk holds the rest.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from flexgen.errors import FlexGenError


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int = 1
    num_gpu_batches: int = 1
    w_gpu_percent: float = 100.0
    w_cpu_percent: float = 0.0
    cache_gpu_percent: float = 100.0
    cache_cpu_percent: float = 0.0
    act_gpu_percent: float = 100.0
    act_cpu_percent: float = 0.0
    overlap: bool = True
    cpu_cache_compute: bool = False
    pin_weight: bool = True
    compress_weight: bool = False
    compress_cache: bool = False

    def __post_init__(self):
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FlexGenError(f"{name} must be an integer >= 1, got {value!r}")
        for kind in ("w", "cache", "act"):
            g, c = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
            for name, value in ((f"{kind}_gpu_percent", g), (f"{kind}_cpu_percent", c)):
                if not 0 <= value <= 100:
                    raise FlexGenError(f"{name} must be within 0..100, got {value}")
            if g + c > 100 + 1e-9:
                raise FlexGenError(f"{kind}_gpu_percent + {kind}_cpu_percent = {g + c} exceeds 100")

    # Disk shares, for reports.
    @property
    def w_disk_percent(self) -> float:
        return 100.0 - self.w_gpu_percent - self.w_cpu_percent

    @property
    def cache_disk_percent(self) -> float:
        return 100.0 - self.cache_gpu_percent - self.cache_cpu_percent

    @property
    def act_disk_percent(self) -> float:
        return 100.0 - self.act_gpu_percent - self.act_cpu_percent

    @property
    def block_size(self) -> int:
        """Sequences that share one load of each layer's weights."""
        return self.gpu_batch_size * self.num_gpu_batches

    @classmethod
    def from_percent(cls, percent, **kwargs) -> "Policy":
        """Build from the original's `--percent wg wc cg cc hg hc` list."""
        if len(percent) != 6:
            raise FlexGenError(f"--percent takes 6 numbers (wg wc cg cc hg hc), got {len(percent)}")
        wg, wc, cg, cc, hg, hc = (float(p) for p in percent)
        return cls(w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc,
                   act_gpu_percent=hg, act_cpu_percent=hc, **kwargs)

    @property
    def percent(self) -> tuple[float, ...]:
        return (self.w_gpu_percent, self.w_cpu_percent, self.cache_gpu_percent,
                self.cache_cpu_percent, self.act_gpu_percent, self.act_cpu_percent)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise FlexGenError(f"unknown policy field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        """Read a policy JSON file: the Policy's fields, optionally under a "policy" key."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FlexGenError(f"policy file not found: {path}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise FlexGenError(f"cannot read policy file {path}: {e}") from None
        if isinstance(data, dict) and "policy" in data:
            data = data["policy"]
        if not isinstance(data, dict):
            raise FlexGenError(f"policy file {path} does not hold a JSON object")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
