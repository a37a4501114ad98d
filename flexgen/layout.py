"""How one layer's weights are laid out as bytes, in the weight store and in memory.

Each tensor sits at a 64-byte aligned offset, in the compute dtype, or 4-bit packed
(data, scale, mn) when weights are compressed and the family marks it quantizable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen.diskio import align_up
from flexgen.models.base import LayerSpec, WeightEntry
from flexgen.models.registry import layer_specs

TENSOR_ALIGN = 64


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


__all__ = ["TENSOR_ALIGN", "LayerLayout", "StoredArray", "compressible", "encode_entry", "make_layout",
           "model_layouts"]
