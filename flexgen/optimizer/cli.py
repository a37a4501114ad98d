"""`python -m flexgen policy ...` (`python -m flexgen profile` is in flexgen/calibrate.py).

`policy_main` takes argv without the subcommand and returns an exit code; user errors
raise FlexGenError (the top-level CLI prints it on one line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexgen.errors import ArgumentParser, FlexGenError
from flexgen.models.base import ModelArgs
from flexgen.models.registry import args_from_config_file, args_from_name, sizes_summary
from flexgen.optimizer.cost_model import GIB, estimate
from flexgen.optimizer.hardware import HardwareProfile, default_profile_path, load_hardware
from flexgen.optimizer.report import format_estimate
from flexgen.optimizer.solver import Budgets, check_budgets, search_detailed
from flexgen.policy import Policy


def model_args_for(model: str) -> ModelArgs:
    """A named size (opt-30b, facebook/opt-30b, llama-3-70b) or a checkpoint directory with config.json."""
    p = Path(model)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise FlexGenError(f"{model}: no config.json in this directory")
        return args_from_config_file(cfg, name=p.name)
    return args_from_name(model)


def _gib_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative size in GiB, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


POLICY_HELP = ("Choose an offloading policy with the cost model and a linear program, or "
               "(with --percent or --policy) predict the throughput and memory of a given one.")


def policy_epilog() -> str:
    return ("Memory sizes are in GiB (2^30 bytes), as in the original FlexGen, whose 'GB' was 2^30. "
            "The gpu budget is the card's size: the profile's gpu reserve (CUDA context, allocator "
            "slack) is taken off it. The cpu budget is memory for tensors; it is cut only where it "
            "exceeds the machine's memory less the process itself. Without --hardware, the profile measured by `flexgen profile` "
            f"({default_profile_path()}) is used.")


def _stage_hosts(args) -> list[int]:
    """The machine of each stage: torchrun gives each node a contiguous run of ranks."""
    n, k = args.num_stages, min(args.nodes, args.num_stages)
    return [s * k // n for s in range(n)]


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `python -m flexgen policy`."""
    p.add_argument("--model", required=True, help=f"a named size of a family: {sizes_summary()}; or a "
                   "checkpoint directory")
    p.add_argument("--prompt-len", type=_positive_int, default=512)
    p.add_argument("--gen-len", type=_positive_int, default=32)
    p.add_argument("--gpu-mem", type=_gib_arg, help="GiB of accelerator memory to use (default: the profile's)")
    p.add_argument("--cpu-mem", type=_gib_arg, help="GiB of host memory to use (default: the profile's)")
    p.add_argument("--disk-mem", type=_gib_arg, help="GiB of disk to use (default: the profile's)")
    p.add_argument("--hardware", help="hardware profile: a bundled name (t4) or a JSON file")
    p.add_argument("--compress-weight", action="store_true",
                   help="allow 4-bit weights (search) / use them (with --percent)")
    p.add_argument("--compress-cache", action="store_true",
                   help="allow a 4-bit KV cache (search) / use it (with --percent)")
    ccc = p.add_mutually_exclusive_group()
    ccc.add_argument("--cpu-cache-compute", dest="cpu_cache_compute", action="store_const", const=True,
                     help="attend on the host for cache rows not on the gpu (search: force it on)")
    ccc.add_argument("--no-cpu-cache-compute", dest="cpu_cache_compute", action="store_const", const=False,
                     help="search: never attend on the host")
    p.add_argument("--no-overlap", action="store_true", help="model a run without I/O-compute overlap")
    p.add_argument("--percent", nargs=6, type=float, metavar=("WG", "WC", "CG", "CC", "HG", "HC"),
                   help="evaluate this placement instead of searching")
    p.add_argument("--gpu-batch-size", type=_positive_int,
                   help="with --percent: the gpu batch size; when searching: fix it")
    p.add_argument("--num-gpu-batches", type=_positive_int,
                   help="with --percent: the number of gpu batches (default 1); when searching: fix it")
    p.add_argument("--policy", help="evaluate a policy JSON file instead of searching")
    p.add_argument("--save", metavar="FILE", help="write the chosen / evaluated policy to FILE (JSON)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the planned run (default: the engine's, float16 on cuda, bfloat16 "
                        "on a CPU with bf16, else float32)")
    p.add_argument("--num-stages", type=_positive_int, default=1,
                   help="plan a pipeline of N stages (torchrun ranks): without --percent / --policy, choose "
                        "each stage's policy for its layers within the budgets (which are per stage); with "
                        "them, predict that policy on every stage")
    p.add_argument("--link-bw", type=float, metavar="GB/S", help="bandwidth between stages (default 10)")
    p.add_argument("--link-latency", type=float, metavar="US", help="latency per message between stages "
                   "(default 20)")
    p.add_argument("--nodes", type=_positive_int, default=1,
                   help="machines the stages run on, in order, as torchrun places ranks (default 1): "
                        "stages on one machine share its disk")


def policy_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="flexgen policy", description=POLICY_HELP, epilog=policy_epilog())
    add_policy_arguments(p)
    return p


def policy_main(argv: list[str]) -> int:
    return policy_run(policy_parser().parse_args(argv))


def policy_run(args) -> int:
    """`python -m flexgen policy` with parsed flags."""
    model = model_args_for(args.model)
    hw = load_hardware(args.hardware).for_engine(args.dtype)
    if args.save:
        from flexgen.outputs import check_writable
        check_writable(args.save, "--save file")  # before the search, not after
    gib = lambda v: None if v is None else v * GIB  # noqa: E731
    budgets = Budgets.from_request(hw, gib(args.gpu_mem), gib(args.cpu_mem), gib(args.disk_mem))
    if args.prompt_len + args.gen_len > model.max_position_embeddings:
        raise FlexGenError(f"--prompt-len + --gen-len = {args.prompt_len + args.gen_len} exceeds the "
                           f"{model.max_position_embeddings} positions of {model.name}")
    if args.percent is not None and args.policy is not None:
        raise FlexGenError("give either --percent or --policy, not both")

    lp_solves = None
    if args.percent is not None or args.policy is not None:
        mode = "evaluate"
        if args.policy is not None:
            policy = Policy.load(args.policy)
            over = {k: True for k in ("compress_weight", "compress_cache") if getattr(args, k)}
            if args.cpu_cache_compute is not None:
                over["cpu_cache_compute"] = args.cpu_cache_compute
            for k, v in (("gpu_batch_size", args.gpu_batch_size), ("num_gpu_batches", args.num_gpu_batches)):
                if v is not None:
                    over[k] = v
            if args.no_overlap:
                over["overlap"] = False
            if over:
                policy = Policy.from_dict(policy.to_dict() | over)
        else:
            if args.gpu_batch_size is None:
                raise FlexGenError("--percent needs --gpu-batch-size (and --num-gpu-batches, default 1)")
            policy = Policy.from_percent(
                args.percent, gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches or 1,
                cpu_cache_compute=bool(args.cpu_cache_compute), compress_weight=args.compress_weight,
                compress_cache=args.compress_cache, overlap=not args.no_overlap)
        est = estimate(model, policy, args.prompt_len, args.gen_len, hw)
        check_budgets(est, budgets)
        if est.shortfalls:
            raise FlexGenError("this policy does not fit: " + "; ".join(est.shortfalls))
    elif args.num_stages > 1:
        mode = "search"
        from flexgen.optimizer.pipeline import search_pipeline
        plan = search_pipeline(model, args.prompt_len, args.gen_len, hw, args.num_stages, [budgets],
                               allow_compress_weight=args.compress_weight, allow_compress_cache=args.compress_cache,
                               cpu_cache_compute=args.cpu_cache_compute, overlap=not args.no_overlap,
                               gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
                               link_bw=args.link_bw and args.link_bw * 1e9,
                               link_latency=None if args.link_latency is None else args.link_latency * 1e-6,
                               hosts=_stage_hosts(args))
        return _print_plan(args, model, hw, plan)
    else:
        mode = "search"
        res = search_detailed(model, args.prompt_len, args.gen_len, hw, gib(args.gpu_mem), gib(args.cpu_mem),
                              gib(args.disk_mem), allow_compress_weight=args.compress_weight,
                              allow_compress_cache=args.compress_cache, cpu_cache_compute=args.cpu_cache_compute,
                              overlap=not args.no_overlap, gpu_batch_size=args.gpu_batch_size,
                              num_gpu_batches=args.num_gpu_batches)
        policy, est, lp_solves = res.policy, res.estimate, res.lp_solves

    if args.save:
        from flexgen.outputs import write_atomic
        write_atomic(args.save, json.dumps({
            "policy": policy.to_dict(), "model": model.name, "prompt_len": args.prompt_len,
            "gen_len": args.gen_len, "hardware": hw.name, "predicted_throughput": est.throughput}, indent=2) + "\n",
                     "--save file")

    if args.num_stages > 1:
        from flexgen.optimizer.pipeline import estimate_pipeline, format_pipeline
        pe = estimate_pipeline(model, [policy], args.prompt_len, args.gen_len, hw, args.num_stages,
                               link_bw=args.link_bw and args.link_bw * 1e9,
                               link_latency=None if args.link_latency is None else args.link_latency * 1e-6,
                               hosts=_stage_hosts(args))
        if args.json:
            print(json.dumps({"mode": mode, "policy": policy.to_dict(), "pipeline": pe.to_dict()}))
        else:
            print(format_pipeline(pe, f"{model.name}: prompt {args.prompt_len}, generate {args.gen_len}, hardware "
                                      f"{hw.name} — the policy on every stage of a {args.num_stages}-stage pipeline"))
        return 0
    if args.json:
        out = {"mode": mode, "policy": policy.to_dict(), "throughput": est.throughput,
               "memory": est.memory, "bottleneck": est.bottleneck, "hardware": hw.name,
               "budgets": budgets.to_dict(), "estimate": est.to_dict()}
        if lp_solves is not None:
            out["lp_solves"] = lp_solves
        print(json.dumps(out))
    else:
        title = (f"{model.name}: prompt {args.prompt_len}, generate {args.gen_len}, hardware {hw.name} — "
                 + ("chosen policy" if mode == "search" else "given policy"))
        print(format_estimate(est, title))
        if lp_solves is not None:
            print(f"\n(searched {lp_solves} linear programs; run the engine with "
                  f"--prompt-len {args.prompt_len} --gen-len {args.gen_len} "
                  f"--percent {' '.join(f'{v:g}' for v in policy.percent)} --gpu-batch-size "
                  f"{policy.gpu_batch_size} --num-gpu-batches {policy.num_gpu_batches}"
                  + "".join(f" --{k.replace('_', '-')}" for k in ("cpu_cache_compute", "compress_weight",
                                                                   "compress_cache") if getattr(policy, k))
                  + ")")
    return 0


def _print_plan(args, model: ModelArgs, hw: HardwareProfile, plan) -> int:
    """`policy --num-stages N` without --percent: every stage's policy and the prediction."""
    from flexgen.optimizer.pipeline import format_pipeline
    pe = plan.estimate
    if args.save:
        from flexgen.outputs import write_atomic
        write_atomic(args.save, json.dumps({
            "policy": plan.policies[0].to_dict(), "stage_policies": [p.to_dict() for p in plan.policies],
            "num_stages": pe.num_stages, "model": model.name, "prompt_len": args.prompt_len,
            "gen_len": args.gen_len, "hardware": hw.name, "predicted_throughput": pe.throughput}, indent=2) + "\n",
                     "--save file")
    if args.json:
        print(json.dumps({"mode": "search", "policies": [p.to_dict() for p in plan.policies],
                          "pipeline": pe.to_dict(), "budgets": [b.to_dict() for b in plan.budgets],
                          "lp_solves": plan.lp_solves}))
        return 0
    print(format_pipeline(pe, f"{model.name}: prompt {args.prompt_len}, generate {args.gen_len}, hardware "
                              f"{hw.name} — chosen policies of a {pe.num_stages}-stage pipeline (budgets per stage)"))
    print(f"\n(searched {plan.lp_solves} linear programs; under torchrun, give each rank its budgets "
          "(--gpu-mem, --cpu-mem, --disk-mem) and no --percent: the ranks choose this plan together)")
    return 0
