"""`python -m flexgen`: run a generation benchmark; subcommands generate, helm, policy,
profile, clean and verify (argparse subparsers; no subcommand is the benchmark run).

User mistakes print one line `flexgen: error: ...` and exit 2; Ctrl-C, SIGTERM and SIGHUP
remove the run's offload files and exit 128 + the signal number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from flexgen.device import dtype_name
from flexgen.errors import ArgumentParser, FlexGenError

DEFAULT_PROMPT = "Paris is the capital city of"
DEFAULT_LENGTHS = (512, 32)   # the FlexGen paper's workload; `flexgen policy` plans for the same


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--model, --dummy, --offload-dir, --device, --dtype: shared by every command that runs the engine."""
    from flexgen.models.registry import sizes_summary

    p.add_argument("--model", required=required, help="a Hugging Face checkpoint directory, a Hugging Face id "
                   f"in the local cache, or (with --dummy) a named size of a family: {sizes_summary()}")
    p.add_argument("--dummy", action="store_true", help="deterministic random weights (no checkpoint needed)")
    p.add_argument("--offload-dir", help="weight store and run files (default $FLEXGEN_OFFLOAD_DIR or "
                   "~/.cache/flexgen)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="compute device (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float16 on cuda, bfloat16 on a CPU with bf16, else float32)")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """A fixed policy (--policy, --percent, batch sizes, flags) or budgets for the optimizer."""
    p.add_argument("--policy", metavar="FILE", help="a policy JSON file (e.g. policies/paper_opt-30b.json); "
                   "flags given explicitly override it")
    p.add_argument("--percent", nargs=6, type=float, metavar=("WG", "WC", "CG", "CC", "HG", "HC"),
                   help="percent of weights, KV cache and activations on gpu and cpu; disk holds the rest "
                        "(default 100 0 100 0 100 0)")
    p.add_argument("--gpu-batch-size", type=int, help="sequences per gpu batch (default 4)")
    p.add_argument("--num-gpu-batches", type=int, help="gpu batches per block (default 1)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false", default=None,
                   help="run loads, compute and stores one after another")
    p.add_argument("--cpu-cache-compute", action="store_true", default=None,
                   help="decode attention on the host for rows whose cache is not on the gpu")
    p.add_argument("--no-pin-weight", dest="pin_weight", action="store_false", default=None,
                   help="do not pin host-memory weights (CUDA only)")
    p.add_argument("--compress-weight", action="store_true", default=None, help="4-bit group-wise weights")
    p.add_argument("--compress-cache", action="store_true", default=None, help="4-bit group-wise KV cache")
    g = p.add_argument_group("automatic policy (used when neither --percent nor --policy is given)")
    g.add_argument("--gpu-mem", type=float, metavar="GIB", help="GiB of accelerator memory to use; choosing a "
                   "policy for these budgets with the cost model and linear program")
    g.add_argument("--cpu-mem", type=float, metavar="GIB", help="GiB of host memory (default: available now)")
    g.add_argument("--disk-mem", type=float, metavar="GIB",
                   help="GiB of disk (default: free space in the offload dir)")
    g.add_argument("--hardware", help="hardware profile: t4 or a JSON file (default: this machine's, "
                   "measured once by `python -m flexgen profile` and cached)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The benchmark run's own flags (no subcommand)."""
    p.add_argument("--prompt-len", type=int, help=f"prompt tokens per sequence (default: the --policy file's, "
                   f"else {DEFAULT_LENGTHS[0]}, the paper's workload)")
    p.add_argument("--gen-len", type=int, help=f"tokens to generate per sequence (default: the --policy file's, "
                   f"else {DEFAULT_LENGTHS[1]})")
    p.add_argument("--num-prompts", type=int, help="sequences to generate (default: one block)")
    p.add_argument("--dry-run", action="store_true", help="print the policy chosen for --gpu-mem and its "
                   "prediction, then stop")
    p.add_argument("--seed", type=int, default=0, help="seed for dummy weights and random prompts")
    p.add_argument("--json-out", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verify-store", action="store_true",
                   help="read the whole weight store and check every checksum before running (each array "
                        "is always checked when first read)")


def add_clean_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload-dir", help="default $FLEXGEN_OFFLOAD_DIR or ~/.cache/flexgen")
    p.add_argument("--stale", action="store_true", help="only what is stale: run files of dead processes, "
                   "unfinished stores, stores whose checkpoint is gone or has changed")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")


def add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload-dir", help="default $FLEXGEN_OFFLOAD_DIR or ~/.cache/flexgen")


CLEAN_HELP = ("Remove what flexgen made under an offload directory: weight stores (not those in use by a running "
              "process) and the run files of processes that are gone. Nothing else in the directory is touched.")
VERIFY_HELP = "Read every weight store under an offload directory and check each tensor's checksum."


def _subcommands() -> dict:
    """name -> (one-line help, description, add its flags, run it with the parsed flags)."""
    from flexgen import calibrate, jobs
    from flexgen.helm import cli as helm_cli
    from flexgen.optimizer import cli as opt_cli

    return {
        "generate": ("a resumable JSONL batch job", jobs.GENERATE_HELP, jobs.add_generate_arguments,
                     jobs.generate_run),
        "helm": ("HELM scenarios (extra: flexgen[helm])", helm_cli.HELM_HELP, helm_cli.add_helm_arguments,
                 helm_cli.helm_run),
        "policy": ("choose or evaluate a policy with the cost model", opt_cli.POLICY_HELP,
                   opt_cli.add_policy_arguments, opt_cli.policy_run),
        "profile": ("measure this machine into a hardware profile", calibrate.PROFILE_HELP,
                    calibrate.add_profile_arguments, calibrate.profile_run),
        "clean": ("remove weight stores and files of dead runs", CLEAN_HELP, add_clean_args, clean_run),
        "verify": ("check every weight store's checksums", VERIFY_HELP, add_verify_args, verify_run),
    }


def build_parser() -> argparse.ArgumentParser:
    """`python -m flexgen [SUBCOMMAND] ...`: without a subcommand, the benchmark run."""
    p = ArgumentParser(
        prog="python -m flexgen",
        usage="%(prog)s --model MODEL [options]  |  %(prog)s SUBCOMMAND [options]",
        description="Generate with a model offloaded across gpu / cpu / disk and report throughput; or run "
                    "one of the subcommands (`python -m flexgen SUBCOMMAND --help`).")
    add_model_args(p, required=False)   # required without a subcommand: checked in `main`
    add_policy_args(p)
    add_run_args(p)
    # prog given: else argparse builds the subcommands' prog from the usage line above.
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", title="subcommands", prog=p.prog)
    for name, (short, description, add_args, run) in _subcommands().items():
        sp = sub.add_parser(name, help=short, description=description)
        add_args(sp)
        sp.set_defaults(run=run)
    return p


def llm_from_args(a, progress: bool = True):
    """A `flexgen.LLM` from add_model_args + add_policy_args flags: a fixed policy with
    --policy / --percent (or batch sizes without budgets), else the optimizer's."""
    from flexgen.llm import LLM

    budgets = a.gpu_mem is not None or a.cpu_mem is not None or a.disk_mem is not None
    fixed = a.policy is not None or a.percent is not None or (
        not budgets and (a.gpu_batch_size is not None or a.num_gpu_batches is not None))
    return LLM(a.model, policy_from_args(a) if fixed else "auto", gpu_mem=a.gpu_mem, cpu_mem=a.cpu_mem,
               disk_mem=a.disk_mem, hardware=a.hardware, offload_dir=a.offload_dir, device=a.device, dtype=a.dtype,
               compress_weight=bool(a.compress_weight), compress_cache=bool(a.compress_cache), dummy=a.dummy,
               progress=progress)


def policy_from_args(a):
    from flexgen.policy import Policy

    base = Policy.load(a.policy) if a.policy else Policy(gpu_batch_size=4)
    fields = base.to_dict()
    if a.percent is not None:
        for name, value in zip(("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                                "act_gpu_percent", "act_cpu_percent"), a.percent):
            fields[name] = value
    for name in ("gpu_batch_size", "num_gpu_batches", "overlap", "cpu_cache_compute", "pin_weight",
                 "compress_weight", "compress_cache"):
        value = getattr(a, name)
        if value is not None:
            fields[name] = value
    return Policy(**fields)


def _auto_policy(a):
    """Search a policy for the budgets (GiB); unspecified budgets come from this machine."""
    from flexgen.autopolicy import choose_policy
    from flexgen.engine import default_offload_dir
    from flexgen.optimizer import format_estimate
    from flexgen.optimizer.cli import model_args_for

    policy, est, _ = choose_policy(
        model_args_for(a.model), a.prompt_len, a.gen_len, offload_dir=Path(a.offload_dir or default_offload_dir()),
        gpu_mem=a.gpu_mem, cpu_mem=a.cpu_mem, disk_mem=a.disk_mem, hardware=a.hardware, device=a.device,
        dtype=a.dtype, compress_weight=bool(a.compress_weight), compress_cache=bool(a.compress_cache),
        cpu_cache_compute=a.cpu_cache_compute, overlap=a.overlap is not False,
        gpu_batch_size=a.gpu_batch_size, num_gpu_batches=a.num_gpu_batches)
    from flexgen import pipeline
    what = ("chosen policy" if pipeline.world_size() == 1 else   # under torchrun: the plan is on stderr
            f"stage {pipeline.rank()}'s policy in the pipeline plan (throughput: the pipeline's)")
    print(format_estimate(est, title=f"{what} for {a.model} ({est.hardware})"))
    return policy


def _prompts(model, a, tokenizer):
    import torch  # deferred: keeps `--help` fast

    n = a.num_prompts or model.policy.block_size
    if a.prompt_len < 1:
        raise FlexGenError(f"--prompt-len must be >= 1, got {a.prompt_len}")
    if tokenizer is not None:
        ids = tokenizer(DEFAULT_PROMPT)["input_ids"]
        ids = (ids * (a.prompt_len // len(ids) + 1))[-a.prompt_len:]  # the prompt text ends the input
        return torch.tensor([ids] * n)
    g = torch.Generator().manual_seed(a.seed)
    return torch.randint(4, model.args.vocab_size, (n, a.prompt_len), generator=g)


def _tokenizer(model: str):
    path = Path(model).expanduser()
    if not path.is_dir() or not any((path / f).exists() for f in ("tokenizer.json", "vocab.json",
                                                                   "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:
        return None  # weights without a usable tokenizer still benchmark


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def report(model, stats, a) -> dict:
    """The figures of a run, as printed and written by --json-out."""
    n_seq = stats.num_sequences
    decode_tokens = stats.generated_tokens - n_seq  # the first new token of each comes from prefill
    return {
        "model": model.args.name,
        "device": str(model.device.device),
        "dtype": dtype_name(model.dtype),
        "policy": model.policy.to_dict(),
        "achieved_percent": model.placement.achieved(),
        "prompt_len": a.prompt_len,
        "gen_len": a.gen_len,
        "num_sequences": n_seq,
        "prefill_latency_s": stats.prefill_time,
        "prefill_throughput_tok_s": stats.prompt_tokens / stats.prefill_time if stats.prefill_time else 0.0,
        "decode_latency_s": stats.decode_time,
        "decode_throughput_tok_s": decode_tokens / stats.decode_time if stats.decode_time else 0.0,
        "total_latency_s": stats.total_time,
        "total_throughput_tok_s": stats.throughput,
        "peak_memory_bytes": dict(stats.peak_memory),
        "weights_held_bytes": model.placement.weight_bytes(),
        "cache_held_bytes": dict(stats.cache_bytes),
        "disk_read_bytes": stats.disk_read_bytes,
        "decode_disk_read_bytes": stats.decode_disk_read_bytes,
        "disk_write_bytes": stats.disk_write_bytes,
        "process_peak_rss_bytes": stats.process_peak_rss,
        "cuda_peak_allocated_bytes": stats.cuda_peak_allocated,
        "cuda_peak_reserved_bytes": stats.cuda_peak_reserved,
        "disk_io_mode": {True: "O_DIRECT", False: "buffered (page cache)", None: "no disk tier used"}[stats.direct_io],
        "timings_s": _with_other(dict(stats.timings)),
    }


def _with_other(t: dict) -> dict:
    """Name every second of a phase: what is neither compute nor a wait is scheduling overhead."""
    for phase in ("prefill", "decode"):
        if phase in t:
            t[f"{phase}.other"] = max(0.0, t[phase] - t.get(f"{phase}.compute", 0.0) - t.get(f"{phase}.wait", 0.0))
    return t


def time_breakdown(t: dict, phase: str, disk_read: int = 0) -> str:
    """Where a phase's seconds went: compute, waits by kind, the rest; how long the I/O
    threads were busy with each kind of load and store (they run beside compute); and
    the rate of the phase's `disk_read` bytes over its wall time."""
    from flexgen.scheduler import IO_KINDS, WAIT_KINDS
    comp, wait = t.get(f"{phase}.compute", 0.0), t.get(f"{phase}.wait", 0.0)
    kinds = ", ".join(f"{k} {t[f'{phase}.wait.{k}']:.1f}" for k in WAIT_KINDS if t.get(f"{phase}.wait.{k}", 0.0) >= 0.05)
    text = (f"compute {comp:.1f} s + waiting for I/O {wait:.1f} s" + (f" ({kinds})" if kinds else "")
            + f" + other {max(0.0, t.get(phase, 0.0) - comp - wait):.1f} s")
    busy = ", ".join(f"{k.replace('_', ' ')} {t[f'{phase}.io.{k}']:.1f} s" for k in IO_KINDS
                     if t.get(f"{phase}.io.{k}", 0.0) >= 0.05)
    text += f"; I/O threads busy: {busy}" if busy else ""
    if disk_read and t.get(phase):
        text += f"; disk reads {disk_read / 1e9:.1f} GB, {disk_read / t[phase] / 1e9:.2f} GB/s over the phase"
    return text


def print_report(r: dict) -> None:
    pol = r["policy"]
    ach = r["achieved_percent"]
    print(f"model {r['model']} on {r['device']} ({r['dtype']}), {r['num_sequences']} sequences, "
          f"block {pol['gpu_batch_size']} x {pol['num_gpu_batches']}, prompt {r['prompt_len']}, gen {r['gen_len']}")
    print("placement (gpu/cpu/disk %, achieved): " + ", ".join(
        f"{k} {v[0]:.1f}/{v[1]:.1f}/{v[2]:.1f}" for k, v in ach.items())
        + f"; disk I/O: {r['disk_io_mode']}")
    rows = [("prefill", r["prefill_latency_s"], r["prefill_throughput_tok_s"], "prompt token/s"),
            ("decode", r["decode_latency_s"], r["decode_throughput_tok_s"], "token/s"),
            ("total", r["total_latency_s"], r["total_throughput_tok_s"], "generated token/s")]
    print(f"{'phase':<8} {'latency (s)':>12} {'throughput':>12}")
    for name, lat, thr, unit in rows:
        print(f"{name:<8} {lat:>12.3f} {thr:>12.2f}  {unit}")
    decode_read = r["decode_disk_read_bytes"]
    for phase, read in (("prefill", r["disk_read_bytes"] - decode_read), ("decode", decode_read)):
        if r["timings_s"].get(phase):
            print(f"{phase}: {time_breakdown(r['timings_s'], phase, read)}")
    mem, held, cache = r["peak_memory_bytes"], r["weights_held_bytes"], r["cache_held_bytes"]
    print(f"{'tier':<8} {'peak held':>12} {'weights':>12} {'KV cache':>12}")
    for tier in ("gpu", "cpu", "disk"):
        print(f"{tier:<8} {_fmt_bytes(mem.get(tier)):>12} {_fmt_bytes(held.get(tier)):>12} "
              f"{_fmt_bytes(cache.get(tier)):>12}")
    extra = (f"disk read {_fmt_bytes(r['disk_read_bytes'])}, written {_fmt_bytes(r['disk_write_bytes'])}; "
             f"process peak RSS {_fmt_bytes(r['process_peak_rss_bytes'])}")
    if r["cuda_peak_allocated_bytes"] is not None:
        extra += (f", CUDA peak allocated {_fmt_bytes(r['cuda_peak_allocated_bytes'])}"
                  f" / reserved {_fmt_bytes(r['cuda_peak_reserved_bytes'])}")
    print(extra)


def _lengths_from_policy_file(a) -> None:
    """Fill unset --prompt-len/--gen-len from the policy file; warn where the file disagrees."""
    meta = {}
    if a.policy:
        try:
            data = json.loads(Path(a.policy).read_text())
            meta = data if isinstance(data, dict) and "policy" in data else {}
        except (OSError, ValueError):
            pass  # Policy.load reports it
    for name, default in (("prompt_len", DEFAULT_LENGTHS[0]), ("gen_len", DEFAULT_LENGTHS[1])):
        given, planned = getattr(a, name), meta.get(name)
        if given is None:
            setattr(a, name, planned if isinstance(planned, int) else default)
        elif isinstance(planned, int) and planned != given:
            print(f"flexgen: warning: {a.policy} was planned for {name.replace('_', ' ')} {planned}; running "
                  f"with --{name.replace('_', '-')} {given}", file=sys.stderr)
    planned = meta.get("model")
    if isinstance(planned, str) and planned != a.model and Path(a.model).name != planned:
        print(f"flexgen: warning: {a.policy} was planned for model {planned}; running {a.model}", file=sys.stderr)


def run(a) -> int:
    """The benchmark run (no subcommand) with parsed flags."""
    from flexgen import pipeline
    from flexgen.engine import load_model

    if pipeline.rank() != 0:  # under torchrun, rank 0 alone prints (errors still go to stderr)
        sys.stdout = open(os.devnull, "w")
        a.quiet = True

    _lengths_from_policy_file(a)
    if a.prompt_len < 1:
        raise FlexGenError(f"--prompt-len must be >= 1, got {a.prompt_len}")
    if a.gen_len < 1:
        raise FlexGenError(f"--gen-len must be >= 1, got {a.gen_len}")
    if a.num_prompts is not None and a.num_prompts < 1:
        raise FlexGenError(f"--num-prompts must be >= 1, got {a.num_prompts}")
    if a.json_out:
        from flexgen.outputs import check_writable
        check_writable(a.json_out, "--json-out file")   # now, not after hours of work
    auto = a.percent is None and a.policy is None and (
        a.gpu_mem is not None or a.cpu_mem is not None or a.disk_mem is not None or a.dry_run)
    if auto:
        if a.gpu_mem is None:
            raise FlexGenError("choosing a policy needs --gpu-mem (GiB of accelerator memory; on a CPU-only "
                               "machine, the part of host memory that plays the gpu tier)")
        policy = _auto_policy(a)
        if a.dry_run:
            return 0
    elif a.dry_run:
        raise FlexGenError("--dry-run prints the policy chosen for --gpu-mem; it does nothing with --percent "
                           "or --policy (see `python -m flexgen policy` to evaluate a given policy)")
    else:
        policy = policy_from_args(a)
    model = load_model(a.model, policy, device=a.device, dtype=a.dtype, offload_dir=a.offload_dir,
                       dummy=a.dummy, seed=a.seed, progress=not a.quiet, prompt_len=a.prompt_len,
                       gen_len=a.gen_len, verify_store=a.verify_store,
                       gpu_mem=a.gpu_mem * 2**30 if a.gpu_mem is not None else None)
    try:
        tokenizer = None if a.dummy else _tokenizer(a.model)
        ids = _prompts(model, a, tokenizer)
        # Fixed-length runs, as the paper measures: no early stop at EOS.
        out = model.generate(ids, max_new_tokens=a.gen_len, eos_token_id=[])
        if tokenizer is not None:
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            print(f"sample: {text!r}")
        r = report(model, model.stats, a)
        if pipeline.world_size() > 1:
            r = pipeline.gather_report(model, r)
            if r is None:
                return 0
        print_report(r)
        if "stages" in r:
            pipeline.print_stages(r)
        if a.json_out:
            from flexgen.outputs import write_atomic
            write_atomic(a.json_out, json.dumps(r, indent=2) + "\n", "--json-out file")
    finally:
        model.close()
    return 0


def clean_run(a) -> int:
    """`python -m flexgen clean` with parsed flags."""
    from flexgen import offload
    from flexgen.engine import default_offload_dir
    from flexgen.weightstore import store_staleness

    root = Path(a.offload_dir).expanduser() if a.offload_dir else default_offload_dir()
    if not root.is_dir():
        print(f"nothing to remove: {root} does not exist")
        return 0
    items, notes = offload.plan_clean(root, stale_only=a.stale, store_stale=store_staleness)
    freed = 0
    for it in items:
        note = None if a.dry_run else offload.remove(it)
        if note:
            notes.append(note)
            continue
        freed += it.nbytes
        print(f"{'would remove' if a.dry_run else 'removed'} {it.path} ({_fmt_bytes(it.nbytes)}): {it.why}")
    for n in notes:
        print(n)
    if not a.dry_run:
        try:
            offload.remove_orphan_locks(root / "weights")
            (root / "weights").rmdir()   # only if nothing is left in it
        except OSError:
            pass
    verb = "would free" if a.dry_run else "freed"
    print(f"{verb} {_fmt_bytes(freed)} under {root}" if items else f"nothing to remove under {root}")
    return 0


def verify_run(a) -> int:
    """`python -m flexgen verify` with parsed flags."""
    from flexgen import offload
    from flexgen.engine import default_offload_dir
    from flexgen.weightstore import WeightStore

    root = Path(a.offload_dir).expanduser() if a.offload_dir else default_offload_dir()
    weights = root / "weights"
    stores = [d for d in sorted(weights.iterdir()) if not d.name.startswith(".") and d.is_dir()
              and offload.read_manifest(d) is not None] if weights.is_dir() else []
    if not stores:
        raise FlexGenError(f"no weight store under {root}")
    for d in stores:
        WeightStore(d, []).verify()
        print(f"ok {d}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, unwound like Ctrl-C so that every cleanup on the way runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def main(argv: Optional[list[str]] = None) -> int:
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _raise_terminated)
    except ValueError:
        pass  # not the main thread: leave signals alone
    try:
        a = build_parser().parse_args(argv)
        if a.command is not None:
            return a.run(a)
        if a.model is None:
            raise FlexGenError("python -m flexgen: the following arguments are required: --model "
                               "(or give a subcommand; see --help)")
        return run(a)
    except FlexGenError as e:
        print(f"flexgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        name = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"flexgen: {name}; run files removed", file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
