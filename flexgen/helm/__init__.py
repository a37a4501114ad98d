"""HELM (crfm-helm) integration: a batch runner and a HELM client backed by `flexgen.LLM`.

Nothing here is imported by `import flexgen`; crfm-helm is an optional extra
(`pip install 'flexgen[helm]'`). Entry points:

- `python -m flexgen helm ...` (`flexgen.helm.cli.helm_main`): run HELM scenarios, every
  request of a run sent to the engine in large batches, HELM's run directory written;
- `flexgen.helm.runner.FlexGenRunner`: the same batching for `helm-run --runner-class-name`;
- `flexgen.helm.client.FlexGenClient`: a HELM client for `model_deployments.yaml`
  (HELM then sends one request at a time).
"""

from __future__ import annotations

from flexgen.errors import FlexGenError

INSTALL_HINT = ("pip install 'flexgen[helm]' -c constraints.txt (a file holding the installed torch, e.g. "
                "torch==2.13.0, so pip keeps it), then `pip uninstall torchvision` on a CPU-only torch")


def require_helm() -> None:
    """Import crfm-helm or raise one FlexGenError line that says how to install it."""
    try:
        import helm.benchmark.runner  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "helm":
            raise FlexGenError(f"HELM is not installed: {INSTALL_HINT}") from None
        raise FlexGenError(f"importing crfm-helm failed ({e}); {INSTALL_HINT}") from None
    except ImportError as e:  # e.g. a torchvision build that does not match torch
        raise FlexGenError(f"importing crfm-helm failed ({e}); {INSTALL_HINT}") from None
