"""Where weights come from, and the weight store they are converted into.

Sources: a local Hugging Face checkpoint directory (config.json + safetensors, sharded
or not, or pytorch_model*.bin), a Hugging Face cache entry by id (offline), or `dummy`
weights (deterministic random, generated one layer at a time).

The weight store is one file per streamed layer in the offload directory, each tensor
at a 64-byte aligned offset, written once in the compute dtype (and 4-bit packed when
weights are compressed), one tensor in memory at a time. A manifest written last holds
the layout, the source's fingerprint and a CRC per tensor; the next run with the same
fingerprint re-uses the store. The disk tier reads any byte range of these files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from flexgen.errors import FlexGenError
from flexgen.models.base import UNQUANTIZED_FIELDS as UNCOMPRESSED_FIELDS  # noqa: F401 (old name)
from flexgen.models.base import LayerSpec, WeightEntry
from flexgen.models.registry import args_from_config_file, args_from_name, layer_specs
from flexgen.diskio import align_up, as_bytes

STORE_VERSION = 1
TENSOR_ALIGN = 64
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------
# Layout of one layer's bytes.

@dataclass(frozen=True)
class StoredArray:
    field: str                 # weight dataclass field
    part: str                  # "" for a plain tensor; "data" / "scale" / "mn" of a packed one
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class LayerLayout:
    spec: LayerSpec
    arrays: tuple[StoredArray, ...]
    nbytes: int                # end of the last array, 64-byte aligned
    compressed: bool

    @property
    def file_bytes(self) -> int:
        return align_up(self.nbytes)


def compressible(entry: WeightEntry) -> bool:
    """Which weights are stored 4-bit: the family says (WeightEntry.quantizable). Norms,
    biases and other 1-D tensors stay 16-bit (tiny, and sensitive); so do the embeddings
    and the LM head (see models/base.UNQUANTIZED_FIELDS)."""
    return bool(entry.quantizable)


def make_layout(spec: LayerSpec, dtype: torch.dtype, compress: bool) -> LayerLayout:
    arrays, off = [], 0
    for e in spec.entries:
        if compress and compressible(e):
            from flexgen.quant import WEIGHT_QUANT, packed_shapes
            parts = [(part, tuple(shape), dt) for part, (shape, dt) in packed_shapes(e.shape, WEIGHT_QUANT).items()]
        else:
            parts = [("", e.shape, dtype)]
        for part, shape, dt in parts:
            n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
            arrays.append(StoredArray(e.field, part, tuple(shape), dt, off, n))
            off = align_up(off + n, TENSOR_ALIGN)
    return LayerLayout(spec, tuple(arrays), off, compress)


def model_layouts(args, dtype: torch.dtype, compress: bool) -> list[LayerLayout]:
    return [make_layout(s, dtype, compress) for s in layer_specs(args)]


def encode_entry(entry: WeightEntry, tensor: torch.Tensor, layout: LayerLayout) -> dict[str, torch.Tensor]:
    """The arrays (by part) that represent `tensor` in the store."""
    arrays = [a for a in layout.arrays if a.field == entry.field]
    if arrays[0].part == "":
        return {"": tensor.to(arrays[0].dtype).contiguous()}
    from flexgen.quant import WEIGHT_QUANT, quantize
    p = quantize(tensor.float(), WEIGHT_QUANT)
    return {"data": p.data, "scale": p.scale, "mn": p.mn}


# ---------------------------------------------------------------------------------------
# Sources.

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


def store_staleness(manifest: dict) -> Optional[str]:
    """Why a store no longer matches any checkpoint (gone, or changed since), else None."""
    src = Path(manifest.get("source", ""))
    if not (src / "config.json").is_file():
        return f"its checkpoint {src} no longer exists"
    files, fp = manifest.get("files"), manifest.get("fingerprint")
    if files is None or fp is None:
        return None  # written before fingerprints were kept: cannot tell
    try:
        if fingerprint(src, files) != fp:
            return f"its checkpoint {src} changed since it was built"
    except OSError:
        return f"its checkpoint {src} changed since it was built"
    return None


def _normalize(key: str) -> str:
    # The one place names are mapped: OPTForCausalLM saves "model.decoder.*", OPTModel "decoder.*".
    key = key.removeprefix("model.")
    if key == "lm_head.weight":
        return "lm_head.weight"  # used only when untied; a tied head reads decoder.embed_tokens
    return key


class DummySource:
    """Deterministic random weights, generated per tensor from (seed, name)."""

    def __init__(self, args, seed: int = 0):
        self.args, self.seed, self.name = args, seed, args.name

    def get(self, name: str, shape: tuple[int, ...], init: str = "normal") -> torch.Tensor:
        # Norm weights 1, biases 0 (the family's WeightEntry.init): keeps activations sane.
        if init == "ones":
            return torch.ones(shape)
        if init == "zeros":
            return torch.zeros(shape)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=g) * 0.02


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


# ---------------------------------------------------------------------------------------
# The weight store.

class WeightStore:
    """Per-layer weight files in the offload directory, read by byte range.

    Every array's CRC32 is in the manifest. A run checks each array the first time its
    bytes are read into memory (`check_range`), so a file corrupted in place gives an
    error instead of different tokens; `verify` reads the whole store.
    """

    def __init__(self, directory: Path, layouts: list[LayerLayout]):
        self.dir = Path(directory)
        self.layouts = layouts
        self.lock = None          # offload.FileLock, shared, while a model uses the store
        self._manifest: Optional[dict] = None

    def layer_path(self, idx: int) -> Path:
        return self.dir / f"layer_{idx:04d}.bin"

    @staticmethod
    def key(source, dtype: torch.dtype, compress: bool) -> str:
        h = hashlib.sha256(f"{STORE_VERSION}:{source.fingerprint()}:{dtype_name(dtype)}:{compress}".encode())
        return f"{source.name}-{dtype_name(dtype)}{'-4bit' if compress else ''}-{h.hexdigest()[:12]}"

    @classmethod
    def open_or_build(cls, source: CheckpointSource, dtype: torch.dtype, compress: bool, root: Path,
                      progress: bool = True) -> "WeightStore":
        """The store for (source, dtype, compress), built if missing; safe with concurrent runs."""
        from flexgen import offload

        layouts = model_layouts(source.args, dtype, compress)
        weights = Path(root) / "weights"
        key = cls.key(source, dtype, compress)
        store = cls(weights / key, layouts)
        log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
        built = []

        def build(tmp: Path) -> None:
            cls(tmp, layouts)._build(source, progress, name=key)
            built.append(tmp)

        store.lock = offload.open_store(weights, key, lambda d: cls(d, layouts)._valid(), build, log)
        if built:
            _note_older_stores(weights, key, source)
        return store

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = json.loads((self.dir / "manifest.json").read_text())
        return self._manifest

    def _valid(self) -> bool:
        manifest = self.dir / "manifest.json"
        if not manifest.is_file():
            return False
        try:
            m = json.loads(manifest.read_text())
        except (json.JSONDecodeError, OSError):
            return False
        if m.get("version") != STORE_VERSION or len(m.get("layers", [])) != len(self.layouts):
            return False
        return all(self.layer_path(i).is_file() and self.layer_path(i).stat().st_size == lay.file_bytes
                   for i, lay in enumerate(self.layouts))

    def _build(self, source: CheckpointSource, progress: bool, name: str = "") -> None:
        """Write the store into self.dir (an empty directory the caller renames into place)."""
        from tqdm import tqdm

        from flexgen.offload import STORE_FORMAT

        manifest = {"format": STORE_FORMAT, "version": STORE_VERSION,
                    "source": str(getattr(source, "path", source.name)), "layers": []}
        if isinstance(source, CheckpointSource):
            manifest["files"] = [f.name for f in source.files]
            manifest["fingerprint"] = source.fingerprint()
        total = sum(lay.nbytes for lay in self.layouts)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing weight store {name or self.dir.name}",
                   disable=None if progress else True, leave=False)
        try:
            for idx, lay in enumerate(self.layouts):
                entries = []
                with open(self.layer_path(idx), "wb") as f:
                    f.truncate(lay.file_bytes)
                    for e in lay.spec.entries:
                        t = source.get(e.name)
                        if tuple(t.shape) != e.shape:
                            raise FlexGenError(f"{e.name}: checkpoint shape {tuple(t.shape)} does not match "
                                               f"config.json ({e.shape})")
                        for part, arr in encode_entry(e, t, lay).items():
                            sa = next(a for a in lay.arrays if a.field == e.field and a.part == part)
                            f.seek(sa.offset)
                            buf = as_bytes(arr.contiguous())
                            f.write(buf)
                            entries.append({"field": e.field, "part": part, "offset": sa.offset,
                                            "nbytes": sa.nbytes, "crc32": zlib.crc32(buf)})
                            bar.update(sa.nbytes)
                        del t
                manifest["layers"].append({"kind": lay.spec.kind, "block": lay.spec.block, "arrays": entries})
            tmp = self.dir / "manifest.json.tmp"
            tmp.write_text(json.dumps(manifest, indent=1))
            os.replace(tmp, self.dir / "manifest.json")  # written last: marks the store complete
        except OSError as e:
            raise FlexGenError(f"writing weight store {self.dir} failed: {e.strerror}") from None
        finally:
            bar.close()

    def check_range(self, idx: int, data: torch.Tensor, start: int, carry: dict[int, int]) -> dict[int, int]:
        """Check the CRCs of layer idx's arrays against `data`, its bytes from `start` on.

        Call it on consecutive ranges of the layer: an array that runs past the end of
        `data` keeps its running CRC in `carry` (returned) for the next range.
        """
        buf = data.numpy() if isinstance(data, torch.Tensor) else data
        end = start + len(buf)
        for a in self.manifest()["layers"][idx]["arrays"]:
            off, stop = a["offset"], a["offset"] + a["nbytes"]
            if stop <= start or off >= end:
                continue
            if off < start and off not in carry:
                continue  # its head was not seen (e.g. checked by a full verify instead)
            crc = zlib.crc32(buf[max(off - start, 0):min(stop, end) - start], carry.pop(off, 0))
            if stop > end:
                carry[off] = crc
            elif crc != a["crc32"]:
                self._corrupt(idx, a)
        return carry

    def _corrupt(self, idx: int, a: dict):
        what = f"{a['field']}{'.' + a['part'] if a['part'] else ''}"
        raise FlexGenError(f"weight store file {self.layer_path(idx)} is corrupt ({what} fails its checksum); "
                           f"rebuild the store from the checkpoint: `python -m flexgen clean --offload-dir "
                           f"{self.dir.parent.parent}`, then run again")

    def verify(self, progress=None) -> None:
        """Read every array of the store and check its CRC; raises FlexGenError on a mismatch."""
        chunk = 64 << 20
        for idx, layer in enumerate(self.manifest()["layers"]):
            try:
                with open(self.layer_path(idx), "rb") as f:
                    for a in layer["arrays"]:
                        f.seek(a["offset"])
                        crc, left = 0, a["nbytes"]
                        while left > 0:
                            b = f.read(min(chunk, left))
                            if not b:
                                break
                            crc, left = zlib.crc32(b, crc), left - len(b)
                        if left or crc != a["crc32"]:
                            self._corrupt(idx, a)
            except OSError as e:
                raise FlexGenError(f"cannot read {self.layer_path(idx)}: {e.strerror}") from None
            if progress is not None:
                progress(idx)


def _note_older_stores(weights: Path, key: str, source) -> None:
    """A changed checkpoint gets a new store; say that the old one stays until cleaned."""
    from flexgen.offload import read_manifest, tree_bytes

    src = str(getattr(source, "path", ""))
    for d in sorted(weights.iterdir()):
        if d.name == key or d.name.startswith(".") or not d.is_dir():
            continue
        m = read_manifest(d)
        if m is not None and m.get("source") == src and store_staleness(m) is not None:
            print(f"flexgen: note: the checkpoint changed since weight store {d} was built; it still holds "
                  f"{tree_bytes(d) / (1 << 30):.2f} GiB (`python -m flexgen clean --stale --offload-dir "
                  f"{weights.parent}` removes it)", file=sys.stderr)


def dummy_layer_bytes(source: DummySource, layout: LayerLayout) -> torch.Tensor:
    """One layer of dummy weights, encoded as the store would hold it (flat uint8)."""
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for e in layout.spec.entries:
        t = source.get(e.name, e.shape, e.init)
        for part, arr in encode_entry(e, t, layout).items():
            sa = next(a for a in layout.arrays if a.field == e.field and a.part == part)
            flat[sa.offset:sa.end].copy_(arr.reshape(-1).view(torch.uint8))
    return flat
