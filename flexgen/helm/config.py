"""HELM configuration files (`helm-run --local-path DIR`) that make a checkpoint a flexgen model.

Three files, as HELM reads them: `model_deployments.yaml` (the deployment, its client
`flexgen.helm.client.FlexGenClient` and the engine's arguments), `model_metadata.yaml`
(a text model with full functionality: logprobs and echo), `tokenizer_configs.yaml` (HELM's
Hugging Face tokenizer on the checkpoint's own tokenizer files, read locally).
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Optional

from flexgen.errors import FlexGenError

_builtin_registered = False
TOKENIZER_CLASS = "helm.tokenizers.huggingface_tokenizer.HuggingFaceTokenizer"


def default_model_name(model: str) -> str:
    """HELM names models "organization/name": flexgen/<checkpoint directory or hub name>."""
    base = Path(model.rstrip("/")).name or "model"
    return "flexgen/" + (re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model")


def _model_path(model: str) -> str:
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model  # a local directory, or a Hugging Face cache id


def checkpoint_facts(model: str) -> dict:
    """Context length and special tokens of a checkpoint, read from its own files (no network)."""
    try:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(_model_path(model), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(_model_path(model), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FlexGenError(f"cannot read the config and tokenizer of {model} (HELM needs the checkpoint's own "
                           f"tokenizer): {str(e).splitlines()[0]}") from None
    n = getattr(config, "max_position_embeddings", None)
    if not n:
        raise FlexGenError(f"{model}: config.json has no max_position_embeddings")
    # HELM counts prompt tokens without the tokenizer's special tokens (OPT's leading </s>) and
    # the engine runs at least one step, also when it only scores a prompt: leave room for both.
    added = len(tok("a")["input_ids"]) - len(tok("a", add_special_tokens=False)["input_ids"])
    return {"max_sequence_length": int(n) - 1 - max(0, added), "end_of_text_token": tok.eos_token or "",
            "prefix_token": tok.bos_token or ""}


def write_configs(directory, model: str, *, model_name: Optional[str] = None, engine_args: Optional[dict] = None,
                  facts: Optional[dict] = None) -> str:
    """Write the three HELM config files for `model` into `directory`; returns the model name
    (also its deployment and tokenizer name). `engine_args` are `flexgen.LLM` keyword arguments
    (plain JSON values) stored in the deployment's client args."""
    import yaml

    name = model_name or default_model_name(model)
    if name.count("/") != 1 or not all(name.split("/")):
        raise FlexGenError(f"a HELM model name is 'organization/name', got {name!r}")
    facts = facts or checkpoint_facts(model)
    path = _model_path(model)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    args = {"model": path, **{k: v for k, v in (engine_args or {}).items() if v is not None}}
    deployments = {"model_deployments": [{
        "name": name, "model_name": name, "tokenizer_name": name,
        "max_sequence_length": facts["max_sequence_length"],
        "client_spec": {"class_name": "flexgen.helm.client.FlexGenClient", "args": args},
    }]}
    metadata = {"models": [{
        "name": name, "display_name": f"{name.split('/')[1]} (flexgen)",
        "description": f"{path}, served by flexgen (offloading batch engine)",
        "creator_organization_name": "flexgen", "access": "open",
        "release_date": datetime.date.today(),
        "tags": ["TEXT_MODEL_TAG", "FULL_FUNCTIONALITY_TEXT_MODEL_TAG"],
    }]}
    tokenizers = {"tokenizer_configs": [{
        "name": name,
        "tokenizer_spec": {"class_name": TOKENIZER_CLASS, "args": {"pretrained_model_name_or_path": path}},
        "end_of_text_token": facts["end_of_text_token"], "prefix_token": facts["prefix_token"],
    }]}
    for fname, data in (("model_deployments.yaml", deployments), ("model_metadata.yaml", metadata),
                        ("tokenizer_configs.yaml", tokenizers)):
        try:
            (d / fname).write_text(yaml.safe_dump(data, sort_keys=False))
        except OSError as e:
            raise FlexGenError(f"cannot write {d / fname}: {e.strerror}") from None
    return name


def register_configs(directory) -> None:
    """Register HELM's built-in configs and those in `directory`, as `helm-run --local-path` does."""
    from helm.benchmark.config_registry import register_builtin_configs_from_helm_package, \
        register_configs_from_directory

    global _builtin_registered
    if not _builtin_registered:
        register_builtin_configs_from_helm_package()
        _builtin_registered = True
    register_configs_from_directory(str(directory))
