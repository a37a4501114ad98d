"""The weight store: a checkpoint converted once into per-layer files the disk tier reads.

One file per streamed layer in the offload directory, laid out as layout.LayerLayout
says, written once in the compute dtype (and 4-bit packed when weights are compressed),
one tensor in memory at a time. A manifest written last holds the layout, the source's
fingerprint and a CRC per tensor; the next run with the same fingerprint re-uses the
store. The disk tier reads any byte range of these files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Optional

import torch

from flexgen.checkpoint import CheckpointSource, DummySource, fingerprint
from flexgen.device import dtype_name
from flexgen.diskio import as_bytes, drop_cached
from flexgen.errors import FlexGenError
from flexgen.layout import LayerLayout, encode_entry, model_layouts

STORE_VERSION = 1


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


def _settle(f) -> None:
    """Put a written layer file on disk and out of the page cache before the run reads it.

    The engine reads the store with O_DIRECT, which must first flush any dirty pages of the
    range it reads, on the critical path; left to background writeback, a fresh store's
    pages are flushed while the run reads, and count against a memory cgroup's limit until
    then (OPT-1.3B under 2 GiB, the run that converted: decode 71 s -> 54 s with this)."""
    f.flush()
    os.fsync(f.fileno())
    drop_cached(f.fileno())


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
                    _settle(f)
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
    flat = torch.empty(layout.nbytes, dtype=torch.uint8)
    covered = 0   # zero only the alignment gaps: every array is written below
    for a in sorted(layout.arrays, key=lambda a: a.offset):
        flat[covered:a.offset].zero_()
        covered = a.end
    flat[covered:].zero_()
    for e in layout.spec.entries:
        plain = [a for a in layout.arrays if a.field == e.field and a.part == ""]
        if plain:   # written in place, in the stored dtype
            source.fill(e.name, flat[plain[0].offset:plain[0].end].view(plain[0].dtype), e.init)
            continue
        t = source.get(e.name, e.shape, e.init)
        for part, arr in encode_entry(e, t, layout).items():
            sa = next(a for a in layout.arrays if a.field == e.field and a.part == part)
            flat[sa.offset:sa.end].copy_(arr.reshape(-1).view(torch.uint8))
    return flat


__all__ = ["STORE_VERSION", "WeightStore", "dummy_layer_bytes", "store_staleness"]
