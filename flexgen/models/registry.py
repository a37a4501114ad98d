"""Model families by the checkpoint's model_type (and `architectures`), and by named size.

The one place that knows which families exist. Everything else asks `family_of(args)`
for the family module and calls the functions listed in models/base.py.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

from flexgen.errors import FlexGenError

# family module -> the config.json model_type values and architectures it loads.
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "opt": (("opt",), ("OPTForCausalLM", "OPTModel")),
    "llama": (("llama",), ("LlamaForCausalLM",)),
    "mistral": (("mistral",), ("MistralForCausalLM",)),
    "qwen2": (("qwen2",), ("Qwen2ForCausalLM",)),
}


def _module(family: str) -> ModuleType:
    return importlib.import_module(f"flexgen.models.{family}")


def family_of(args) -> ModuleType:
    """The family module of a ModelArgs."""
    return importlib.import_module(type(args).__module__)


def _family_name(config: dict) -> str | None:
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    for family, (types, architectures) in FAMILIES.items():
        if model_type in types or (model_type is None and any(a in architectures for a in archs)):
            return family
    return None


def family_for_config(config: dict, name: str = "model") -> ModuleType:
    family = _family_name(config)
    if family is not None:
        return _module(family)
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    known = sorted(t for types, _ in FAMILIES.values() for t in types)
    raise FlexGenError(f"{name}: model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not "
                       f"supported; supported model types: {', '.join(known)}")


def args_from_config(config: dict, name: str = "model"):
    """ModelArgs of the right family from a Hugging Face config.json dict."""
    mod = family_for_config(config, name)
    if config.get("model_type") is None:  # found by `architectures`: give the family its own type
        config = dict(config, model_type=mod.MODEL_TYPES[0])
    return mod.ModelArgs.from_config(config, name=name)


def args_from_config_file(path: Path, name: str):
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise FlexGenError(f"{path}: not valid JSON ({e})") from None
    return args_from_config(config, name)


def named_sizes() -> dict[str, ModuleType]:
    """Every named size -> its family module."""
    return {size: mod for mod in map(_module, FAMILIES) for size in mod.SIZES}


def sizes_summary() -> str:
    """The families and some of their named sizes, for --model's help:
    "opt (opt-125m, opt-350m ... opt-175b), llama (...), ..."."""
    parts = []
    for family in FAMILIES:
        sizes = list(_module(family).SIZES)
        shown = ", ".join(sizes) if len(sizes) <= 3 else f"{sizes[0]}, {sizes[1]} ... {sizes[-1]}"
        parts.append(f"{family} ({shown})")
    return ", ".join(parts)


def args_from_name(name: str):
    """ModelArgs of a named size (opt-30b, meta-llama/Llama-3.1-8B, qwen2.5-7b)."""
    key = name.lower().split("/")[-1]
    sizes = named_sizes()
    if key not in sizes:
        raise FlexGenError(f"unknown model {name!r}; named sizes: {', '.join(sizes)} (or give a checkpoint directory)")
    return sizes[key].ModelArgs.from_name(key)


def layer_specs(args) -> list:
    return family_of(args).layer_specs(args)


def cost_figures(args):
    return family_of(args).cost_figures(args)
