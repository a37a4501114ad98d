"""A HELM client backed by `flexgen.LLM`, and the engines shared by the client and the batch runner.

In `model_deployments.yaml`:

    client_spec:
      class_name: flexgen.helm.client.FlexGenClient
      args: {model: /path/to/checkpoint, gpu_mem: 4}   # any flexgen.LLM keyword argument

`python -m flexgen helm --model DIR --write-config DIR` writes such a file, with the model's
metadata and tokenizer entries, for `helm-run --local-path DIR`. HELM's own executor calls a
client one request at a time; `helm-run --runner-class-name flexgen.helm.runner.FlexGenRunner`
batches a whole run instead.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any, Optional

LLM_ARGS = ("policy", "gpu_mem", "cpu_mem", "disk_mem", "hardware", "offload_dir", "device", "dtype",
            "compress_weight", "compress_cache", "tokenizer")
CLIENT_CLASS = "flexgen.helm.client.FlexGenClient"

_lock = threading.RLock()
_engines: dict[str, Any] = {}  # model deployment name -> flexgen.LLM
_engine_locks: dict[str, threading.Lock] = {}  # one generate at a time per engine (HELM runs client threads)


def register_engine(deployment: str, llm) -> None:
    """Use an engine already built (by `python -m flexgen helm`) for a model deployment."""
    with _lock:
        _engines[deployment] = llm


def forget_engine(deployment: str) -> None:
    with _lock:
        _engines.pop(deployment, None)


def build_engine(model: str, **kwargs):
    import flexgen

    unknown = sorted(set(kwargs) - set(LLM_ARGS))
    if unknown:
        raise flexgen.FlexGenError(f"unknown flexgen client argument(s) {', '.join(unknown)}; "
                                   f"known: model, {', '.join(LLM_ARGS)}")
    return flexgen.LLM(model, **{k: v for k, v in kwargs.items() if v is not None})


def engine_for(deployment: str, args: Optional[dict] = None):
    """The engine of a model deployment: a registered one, or one built once from the deployment's
    client args (`args`, or the HELM registry's `model_deployments.yaml` entry)."""
    with _lock:
        llm = _engines.get(deployment)
        if llm is None:
            if args is None:
                args = deployment_args(deployment)
            llm = build_engine(**args)
            _engines[deployment] = llm
            atexit.register(_close, deployment)
        return llm


def _close(deployment: str) -> None:
    with _lock:
        llm = _engines.pop(deployment, None)
    if llm is not None:
        llm.close()


def offline() -> bool:
    """Hugging Face's offline switch, which flexgen's HELM runner and client also apply to HELM's nltk data."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def no_nltk_downloads() -> None:
    # HELM's reference metrics (exact_match among them) try to download nltk's punkt tables when they
    # are imported; only BLEU/ROUGE use them. Offline, skip the attempt instead of reaching out.
    import nltk

    if getattr(nltk.download, "_flexgen_offline", False):
        return

    def download(info_or_id=None, *args, **kwargs):
        from helm.common.hierarchical_logger import hlog

        hlog(f"offline (HF_HUB_OFFLINE): not downloading nltk data {info_or_id!r}")
        return False

    download._flexgen_offline = True
    nltk.download = download


def engine_lock(deployment: str) -> threading.Lock:
    """The lock that serialises generation on a deployment's engine: HELM's executor calls a client
    from several threads, and an engine runs one batch at a time."""
    with _lock:
        return _engine_locks.setdefault(deployment, threading.Lock())


def is_flexgen_deployment(deployment: str) -> bool:
    from helm.benchmark.model_deployment_registry import get_model_deployment

    with _lock:
        if deployment in _engines:
            return True
    try:
        return get_model_deployment(deployment).client_spec.class_name == CLIENT_CLASS
    except ValueError:
        return False


def deployment_args(deployment: str) -> dict:
    from helm.benchmark.model_deployment_registry import get_model_deployment

    return dict(get_model_deployment(deployment).client_spec.args)


def max_sequence_length(deployment: str) -> Optional[int]:
    from helm.benchmark.model_deployment_registry import get_model_deployment

    try:
        return get_model_deployment(deployment).max_sequence_length
    except ValueError:
        return None


try:
    from helm.clients.client import Client as _Client
except ImportError:  # crfm-helm missing: the class below is only named, never used
    _Client = object


class FlexGenClient(_Client):
    """HELM client: one `make_request` runs one request (all its completions) through the engine."""

    def __init__(self, model: str, cache_config=None, **kwargs):
        # HELM injects constructor arguments by name (cache_config here); results are not cached:
        # an offline batch job runs each request once.
        self._args = {"model": model, **kwargs}
        if offline():  # built before HELM imports its metrics, which would fetch nltk data
            no_nltk_downloads()

    def make_request(self, request):
        from flexgen.helm.convert import generate

        name = request.model_deployment
        with engine_lock(name):
            llm = engine_for(name, self._args)
            return generate(llm, [request], max_sequence_length=max_sequence_length(name))[0]
