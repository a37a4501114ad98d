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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flexgen helm",
        description="Run HELM scenarios on a checkpoint with flexgen: every request of a run goes to the engine "
                    "in large batches; HELM computes the metrics and writes its run directory.")
    p.add_argument("--description", action="append", default=[], metavar="RUN_ENTRY",
                   help='a HELM run entry without model=, e.g. "synthetic_reasoning:mode=pattern_match" '
                        "(repeatable)")
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout, with its tokenizer) "
                   "or a Hugging Face id in the local cache")
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
    g = p.add_argument_group("policy (default: chosen by the optimizer for the memory budgets)")
    g.add_argument("--policy", metavar="FILE", help="a policy JSON file; flags below override its fields")
    g.add_argument("--percent", nargs=6, type=float, metavar=("WG", "WC", "CG", "CC", "HG", "HC"),
                   help="percent of weights, KV cache and activations on gpu and cpu; disk holds the rest")
    g.add_argument("--gpu-batch-size", type=int, help="sequences per gpu batch")
    g.add_argument("--num-gpu-batches", type=int, help="gpu batches per block")
    g.add_argument("--compress-weight", action="store_true", default=None, help="4-bit group-wise weights")
    g.add_argument("--compress-cache", action="store_true", default=None, help="4-bit group-wise KV cache")
    g.add_argument("--gpu-mem", type=float, metavar="GIB", help="GiB of accelerator memory to use")
    g.add_argument("--cpu-mem", type=float, metavar="GIB", help="GiB of host memory")
    g.add_argument("--disk-mem", type=float, metavar="GIB", help="GiB of disk")
    g.add_argument("--offload-dir", help="weight store and run files (default $FLEXGEN_OFFLOAD_DIR or "
                   "~/.cache/flexgen)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="compute device (default: cuda if available)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: float16 "
                   "on cuda, bfloat16 on a CPU with bf16, else float32)")
    return p


def _policy(a):
    """A Policy when the flags fix one, else None (the engine's optimizer chooses from the budgets)."""
    from flexgen.policy import Policy

    if a.policy is None and a.percent is None and a.gpu_batch_size is None and a.num_gpu_batches is None:
        return None
    fields = (Policy.load(a.policy) if a.policy else Policy()).to_dict()
    if a.percent is not None:
        for name, value in zip(("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                                "act_gpu_percent", "act_cpu_percent"), a.percent):
            fields[name] = value
    for name in ("gpu_batch_size", "num_gpu_batches", "compress_weight", "compress_cache"):
        if getattr(a, name) is not None:
            fields[name] = getattr(a, name)
    return Policy(**fields)


def _engine_args(a, policy) -> dict:
    return {"policy": policy, "gpu_mem": a.gpu_mem, "cpu_mem": a.cpu_mem, "disk_mem": a.disk_mem,
            "offload_dir": a.offload_dir, "device": a.device, "dtype": a.dtype,
            "compress_weight": a.compress_weight, "compress_cache": a.compress_cache}


def _validate(a) -> None:
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


def write_config_main(a, policy) -> int:
    from flexgen.helm.config import write_configs

    d = Path(a.write_config)
    args = _engine_args(a, None)
    if policy is not None:  # the deployment names a policy file, which lives beside the configs
        d.mkdir(parents=True, exist_ok=True)
        policy.save(d / "flexgen_policy.json")
        args["policy"] = str((d / "flexgen_policy.json").resolve())
    for k in ("offload_dir",):
        if args[k] is not None:
            args[k] = str(Path(args[k]).expanduser().resolve())
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


def helm_main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    _validate(a)
    from flexgen.helm import require_helm

    require_helm()
    policy = _policy(a)
    if a.write_config:
        return write_config_main(a, policy)

    import flexgen
    from flexgen.helm import client
    from flexgen.helm.config import register_configs, write_configs
    from flexgen.helm.runner import run_helm, run_specs_for

    with tempfile.TemporaryDirectory(prefix="flexgen-helm-") as local:
        name = write_configs(local, a.model, model_name=a.model_name, engine_args={})
        register_configs(local)
        specs = run_specs_for(a.description, name, a.max_eval_instances, a.num_train_trials)  # before the load
        llm = flexgen.LLM(a.model, progress=not a.quiet,
                          **{k: v for k, v in _engine_args(a, policy).items() if v is not None})
        client.register_engine(name, llm)
        try:
            run_dirs = run_helm(specs, output_path=a.output_path, suite=a.suite, local_path=local,
                                progress=not a.quiet, skip_completed=a.skip_completed_runs)
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
