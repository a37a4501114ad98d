"""`python -m flexgen helm`: evaluate a checkpoint on HELM scenarios with batched flexgen generation.

    python -m flexgen helm --model DIR --description "synthetic_reasoning:mode=pattern_match" \\
        --max-eval-instances 10 --gpu-mem 4 --output-path benchmark_output --suite flexgen
    helm-summarize --suite flexgen --output-path benchmark_output

Each run's requests go to the engine in one batch job; HELM adapts the instances, computes
the metrics and writes its usual run directory (runs/SUITE/RUN/{run_spec,scenario_state,
stats,per_instance_stats}.json). `--write-config DIR` instead writes the HELM config files
for `helm-run --local-path DIR` (see README, "HELM").
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Optional

from flexgen.errors import FlexGenError


HELM_HELP = ("Run HELM scenarios on a checkpoint with flexgen: every request of a run goes to the engine "
             "in large batches; HELM computes the metrics and writes its run directory.")


def add_helm_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `python -m flexgen helm`."""
    from flexgen.cli import add_model_args, add_policy_args

    add_model_args(p)
    p.add_argument("--description", action="append", default=[], metavar="RUN_ENTRY",
                   help='a HELM run entry without model=, e.g. "synthetic_reasoning:mode=pattern_match" '
                        "(repeatable)")
    p.add_argument("--model-name", help="HELM model name, organization/name (default flexgen/<checkpoint name>)")
    p.add_argument("--max-eval-instances", type=int, default=10, metavar="N",
                   help="evaluation instances per run (default 10)")
    p.add_argument("--num-train-trials", type=int, metavar="N", help="HELM train trials (default: the run's)")
    p.add_argument("--output-path", default="benchmark_output", help="HELM output directory (default "
                   "benchmark_output)")
    p.add_argument("--suite", default="flexgen", help="HELM suite name: runs go to OUTPUT/runs/SUITE "
                   "(default flexgen)")
    p.add_argument("--skip-completed-runs", action="store_true", help="skip runs whose output files all exist")
    p.add_argument("--write-config", metavar="DIR", help="only write HELM's model_deployments.yaml, "
                   "model_metadata.yaml and tokenizer_configs.yaml for `helm-run --local-path DIR`")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_policy_args(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flexgen helm", description=HELM_HELP)
    add_helm_arguments(p)
    return p


def _fixed_policy(a):
    """The policy the flags fix, as `python -m flexgen generate` reads them; None: the optimizer's."""
    from flexgen.cli import policy_from_args

    budgets = a.gpu_mem is not None or a.cpu_mem is not None or a.disk_mem is not None
    fixed = a.policy is not None or a.percent is not None or (
        not budgets and (a.gpu_batch_size is not None or a.num_gpu_batches is not None))
    return policy_from_args(a) if fixed else None


def _validate(a) -> None:
    if a.dummy:
        raise FlexGenError("HELM needs a checkpoint with its tokenizer; --dummy weights have none")
    if a.max_eval_instances < 1:
        raise FlexGenError(f"--max-eval-instances must be >= 1, got {a.max_eval_instances}")
    if a.num_train_trials is not None and a.num_train_trials < 1:
        raise FlexGenError(f"--num-train-trials must be >= 1, got {a.num_train_trials}")
    for name in ("gpu_mem", "cpu_mem", "disk_mem"):
        v = getattr(a, name)
        if v is not None and not v >= 0:
            raise FlexGenError(f"--{name.replace('_', '-')} must be a size in GiB >= 0, got {v}")
    if not a.write_config and not a.description:
        raise FlexGenError("give at least one --description (a HELM run entry such as "
                           "\"synthetic_reasoning:mode=pattern_match\"), or --write-config DIR")
    if a.write_config and a.description:
        raise FlexGenError("--write-config only writes HELM's config files; run the descriptions with helm-run, "
                           "or drop --write-config")


def write_config_main(a) -> int:
    from flexgen.helm.config import write_configs

    d = Path(a.write_config)
    args = {"policy": "auto", "gpu_mem": a.gpu_mem, "cpu_mem": a.cpu_mem, "disk_mem": a.disk_mem,
            "hardware": a.hardware, "device": a.device, "dtype": a.dtype,
            "compress_weight": bool(a.compress_weight), "compress_cache": bool(a.compress_cache),
            "offload_dir": str(Path(a.offload_dir).expanduser().resolve()) if a.offload_dir else None}
    policy = _fixed_policy(a)
    if policy is not None:  # the deployment names a policy file, which lives beside the configs
        d.mkdir(parents=True, exist_ok=True)
        policy.save(d / "flexgen_policy.json")
        args["policy"] = str((d / "flexgen_policy.json").resolve())
    if a.hardware and Path(a.hardware).expanduser().exists():
        args["hardware"] = str(Path(a.hardware).expanduser().resolve())
    name = write_configs(d, a.model, model_name=a.model_name, engine_args=args)
    print(f"wrote {d}/model_deployments.yaml, model_metadata.yaml, tokenizer_configs.yaml for {name}; run:")
    print(f'  helm-run --local-path {d} --run-entries "synthetic_reasoning:mode=pattern_match,model={name}" '
          f"--suite {a.suite} --max-eval-instances {a.max_eval_instances} "
          "--runner-class-name flexgen.helm.runner.FlexGenRunner")
    return 0


def _summary(run_dirs: list[str]) -> None:
    """One line per run and split: its accuracy metrics, instances and mean engine batch size."""
    wanted = ("exact_match", "quasi_exact_match", "exact_match_indicator", "num_instances", "batch_size")
    for d in run_dirs:
        try:
            stats = json.loads((Path(d) / "stats.json").read_text())
        except (OSError, ValueError):
            print(f"{Path(d).name}: no stats.json")
            continue
        by_split: dict[str, dict[str, float]] = {}
        for s in stats:
            n = s["name"]
            if n["name"] in wanted and "perturbation" not in n and s.get("count"):
                by_split.setdefault(n.get("split", "-"), {})[n["name"]] = s["mean"]
        for split, values in sorted(by_split.items()):
            shown = ", ".join(f"{k} {values[k]:.4g}" for k in wanted if k in values)
            print(f"{Path(d).name} [{split}]: {shown}")
        print(f"  -> {d}")


def _network_error(e: OSError) -> bool:
    from urllib.error import URLError

    return isinstance(e, (ConnectionError, URLError)) or type(e).__module__.split(".")[0] in (
        "requests", "urllib3", "huggingface_hub", "datasets", "fsspec", "aiohttp")


def helm_main(argv: list[str]) -> int:
    return helm_run(build_parser().parse_args(argv))


def helm_run(a) -> int:
    """`python -m flexgen helm` with parsed flags."""
    _validate(a)
    from flexgen.helm import require_helm

    require_helm()
    if a.write_config:
        return write_config_main(a)

    from flexgen.cli import llm_from_args
    from flexgen.helm import client
    from flexgen.helm.config import register_configs, write_configs
    from flexgen.helm.runner import run_helm, run_specs_for

    with tempfile.TemporaryDirectory(prefix="flexgen-helm-") as local:
        name = write_configs(local, a.model, model_name=a.model_name, engine_args={})
        register_configs(local)
        specs = run_specs_for(a.description, name, a.max_eval_instances, a.num_train_trials)  # before the load
        llm = llm_from_args(a, progress=not a.quiet)
        client.register_engine(name, llm)
        try:
            run_dirs = run_helm(specs, output_path=a.output_path, suite=a.suite, local_path=local,
                                progress=not a.quiet, skip_completed=a.skip_completed_runs)
        except OSError as e:
            raise FlexGenError(f"the HELM run failed: {type(e).__name__}: {e}" + (
                "; this scenario downloads its data (offline, use scenarios that ship it, such as "
                "synthetic_reasoning, dyck_language or simple1)" if _network_error(e) else "")) from None
        finally:
            client.forget_engine(name)
            llm.close()
    _summary(run_dirs)
    print(f"summarize: helm-summarize --suite {a.suite} --output-path {a.output_path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:  # `python -m flexgen.helm.cli`
    import sys

    try:
        return helm_main(list(sys.argv[1:] if argv is None else argv))
    except FlexGenError as e:
        print(f"flexgen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
