"""Where weights come from.

A local Hugging Face checkpoint directory (config.json + safetensors, sharded or not, or
pytorch_model*.bin), a Hugging Face cache entry by id (offline), or `dummy` weights
(deterministic random, generated one tensor at a time). The engine never computes from
a source directly: weightstore.WeightStore converts it first.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Optional

import torch

from flexgen.errors import FlexGenError
from flexgen.models.registry import args_from_config_file, args_from_name, layer_specs


class CheckpointSource:
    """A local Hugging Face checkpoint directory of a supported family."""

    def __init__(self, path: Path, name: Optional[str] = None):
        self.path = Path(path)
        self.name = name or self.path.name
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise FlexGenError(f"{self.path}: no config.json (not a Hugging Face checkpoint directory)")
        self.args = args_from_config_file(cfg, name=self.name)
        self.files = self._weight_files()
        self._index: dict[str, tuple[Path, str]] = {}
        self._open: dict[Path, object] = {}
        for f in self.files:
            for key in self._keys(f):
                self._index.setdefault(_normalize(key), (f, key))
        missing = [e.name for s in layer_specs(self.args) for e in s.entries if e.name not in self._index]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FlexGenError(f"{self.path}: checkpoint lacks {missing[0]}{more}; does config.json match the weights?")

    def _weight_files(self) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise FlexGenError(f"{index}: malformed index ({e})") from None
                files = sorted({self.path / f for f in weight_map.values()})
                for f in files:
                    if not f.is_file():
                        raise FlexGenError(f"{self.path}: shard {f.name} named in {index_name} is missing")
                return files
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / name).is_file():
                return [self.path / name]
        raise FlexGenError(f"{self.path}: no model.safetensors or pytorch_model.bin weights found")

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    from safetensors import safe_open
                    self._open[f] = safe_open(str(f), framework="pt", device="cpu")
                else:
                    try:
                        self._open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                        self._open[f] = torch.load(f, map_location="cpu", weights_only=True)
            except FlexGenError:
                raise
            except Exception as e:  # safetensors/torch raise several types for damaged files
                raise FlexGenError(f"cannot read {f}: {e} (truncated or corrupt file?)") from None
        return self._open[f]

    def _keys(self, f: Path) -> list[str]:
        h = self._handle(f)
        return list(h.keys())

    def get(self, name: str) -> torch.Tensor:
        f, key = self._index[name]
        h = self._handle(f)
        try:
            return h.get_tensor(key) if f.suffix == ".safetensors" else h[key]
        except Exception as e:
            raise FlexGenError(f"cannot read tensor {key} from {f}: {e} (truncated or corrupt file?)") from None

    def fingerprint(self) -> str:
        return fingerprint(self.path, [f.name for f in self.files])

    def close(self):
        self._open.clear()


def fingerprint(path: Path, files: list[str]) -> str:
    """What identifies a checkpoint's contents cheaply: config.json, and each weight file's size and mtime."""
    h = hashlib.sha256((Path(path) / "config.json").read_bytes())
    for name in files:
        st = (Path(path) / name).stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _normalize(key: str) -> str:
    # The one place names are mapped: OPTForCausalLM saves "model.decoder.*", OPTModel "decoder.*".
    key = key.removeprefix("model.")
    if key == "lm_head.weight":
        return "lm_head.weight"  # used only when untied; a tied head reads decoder.embed_tokens
    return key


class DummySource:
    """Deterministic random weights: normal(0, 0.02) values read from one pool of random
    draws (made once per seed) at an offset given by the tensor's name.

    Drawing every value (torch.randn, ~130 M values/s on one core) took minutes for a
    30B-parameter model; copying from the pool runs at memory speed, and the values do
    not change the time of a dense model. The pool's length is odd, so rows of a
    power-of-two width do not line up with its repeats."""

    POOL = (1 << 24) + 1_111

    def __init__(self, args, seed: int = 0):
        self.args, self.seed, self.name = args, seed, args.name
        self._pools: dict[torch.dtype, torch.Tensor] = {}

    def _pool2(self, dtype: torch.dtype) -> torch.Tensor:
        """The pool twice over in `dtype` (the fp32 draws, cast): any POOL values from an
        offset below POOL are one slice."""
        if dtype not in self._pools:
            if torch.float32 not in self._pools:
                pool = torch.randn(self.POOL, generator=torch.Generator().manual_seed(self.seed)) * 0.02
                self._pools[torch.float32] = torch.cat([pool, pool])
            self._pools[dtype] = self._pools[torch.float32].to(dtype)
        return self._pools[dtype]

    def fill(self, name: str, out: torch.Tensor, init: str = "normal") -> torch.Tensor:
        """Write tensor `name` into `out` (contiguous, any float dtype): the values of
        get(name) in out's dtype, without a float32 copy of the whole tensor."""
        # Norm weights 1, biases 0 (the family's WeightEntry.init): keeps activations sane.
        if init in ("ones", "zeros"):
            return out.fill_(1.0 if init == "ones" else 0.0)
        pool, n = self._pool2(out.dtype), self.POOL
        flat = out.view(-1)
        off = zlib.crc32(name.encode()) % n
        for i in range(0, flat.numel(), n):
            k = min(n, flat.numel() - i)
            flat[i:i + k].copy_(pool[off:off + k])
        return out

    def get(self, name: str, shape: tuple[int, ...], init: str = "normal") -> torch.Tensor:
        return self.fill(name, torch.empty(shape), init)


def resolve_source(model: str, dummy: bool, seed: int = 0):
    """NAME (a named size), a checkpoint directory, or a Hugging Face id in the local cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        if dummy:  # random weights in the shape of a local checkpoint's config
            cfg = path / "config.json"
            if not cfg.is_file():
                raise FlexGenError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
            return DummySource(args_from_config_file(cfg, path.name), seed)
        return CheckpointSource(path)
    if dummy:
        return DummySource(args_from_name(model), seed)
    if path.exists() or model.startswith((".", "/", "~")):
        raise FlexGenError(f"{model}: not a checkpoint directory")
    cached = _hf_cache_lookup(model)
    if cached is not None:
        return CheckpointSource(cached, name=model.split("/")[-1])
    raise FlexGenError(f"model {model!r}: not a local checkpoint directory and not in the Hugging Face "
                       "cache (no download is attempted); pass a directory, or --dummy for random weights")


def _hf_cache_lookup(model: str) -> Optional[Path]:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    ids = [model] if "/" in model else [f"facebook/{model}", model]
    for repo_id in ids:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:  # not cached, or an invalid id
            continue
    return None


__all__ = ["CheckpointSource", "DummySource", "fingerprint", "resolve_source"]
