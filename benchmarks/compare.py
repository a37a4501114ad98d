"""flexgen against what a user would run instead, on the same workload, in one run.

Each system runs in its own process; with a memory limit, that process is placed in a
memory cgroup whose limit counts RSS and page cache (cgroup v1 `memory.limit_in_bytes`, or
v2 `memory.max`), and the page cache is dropped between systems (as root), so no system
reads another's cached file. Systems:

- transformers: `AutoModelForCausalLM.from_pretrained(dir)` wholly in memory (no limit).
- accelerate: `from_pretrained(dir, device_map="auto", max_memory={"cpu": ...},
  offload_folder=...)`, the user's choice when the model does not fit; each batch size of
  --peer-batches is tried, the best reported.
- flexgen-auto: the optimizer's policy for the same budget (`--gpu-mem/--cpu-mem/--disk-mem`
  as a user would give them).
- flexgen: a given policy (`--policy-percent`, `--policy-gbs`, `--policy-ngb`).

Every system gets the same random prompts (token ids) of one checkpoint, EOS ignored.
Prefill time is the time to the first new token (a streamer timestamps it), decode the rest;
throughput = generated tokens / (prefill + decode). Peak memory: the process's peak RSS and,
under a cgroup, its peak RSS + page cache.

    python benchmarks/compare.py --workload smoke              # tiny models, seconds (run by the tests)
    python benchmarks/compare.py --workload offload-6.7b --record
    python benchmarks/compare.py --workload decode-13b-4g --compress --measure-rates   # bound with rates of now
    python benchmarks/compare.py --list

The random checkpoints are written once under --ckpt-dir, one shard at a time (never the
whole model in memory); free disk is checked first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

GIB = 1 << 30
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Workload:
    model: str                      # flexgen named size, or "tiny" (a 2-layer random OPT)
    prompt_len: int
    gen_len: int
    limit_gib: Optional[float]      # memory cgroup limit for every system; None: no limit
    systems: tuple
    peer_batches: tuple = (8, 16, 32)
    flexgen_budget: tuple = ()      # (gpu, cpu, disk) GiB of tensors for flexgen-auto
    flexgen_block: tuple = ()       # (gpu batch size, gpu batches) to hold flexgen-auto to; () = its choice
    note: str = ""


WORKLOADS = {
    "smoke": Workload("tiny", 16, 4, 1.5, ("transformers", "accelerate", "flexgen-auto", "flexgen"),
                      peer_batches=(8,), flexgen_budget=(1.2, 0.4, 2), note="tiny random OPT, seconds"),
    "inmem-1.3b": Workload("opt-1.3b", 128, 32, None, ("transformers", "flexgen"), note="everything fits"),
    "offload-6.7b": Workload("opt-6.7b", 32, 64, 8, ("accelerate", "flexgen-auto"), peer_batches=(16, 32, 64),
                             flexgen_budget=(2, 4, 40), note="13.4 GB model, 8 GiB limit, decode-heavy"),
    "offload-6.7b-4g": Workload("opt-6.7b", 16, 8, 4, ("accelerate", "flexgen-auto"), peer_batches=(16, 32, 64),
                                flexgen_budget=(1, 2, 40),
                                note="13.4 GB model, 4 GiB limit (model >= 3x the limit), short prompts"),
    # Accelerate's batch is capped by memory here (a sequence's KV cache is 143 MB in bf16), and
    # flexgen's block is held to 64 so that the run takes minutes, not the optimizer's hour-long
    # block of 300+ sequences.
    "offload-6.7b-p256": Workload("opt-6.7b", 256, 16, 4, ("accelerate", "flexgen-auto"), peer_batches=(2, 4, 8),
                                  flexgen_budget=(1, 2, 60), flexgen_block=(8, 8),
                                  note="13.4 GB model, 4 GiB limit, prompt 256: Accelerate's batch is memory-capped"),
    # Decode-heavy with the model more than 3x the limit: Accelerate re-reads the weights it
    # cannot hold at every step, for a batch its KV cache caps. flexgen's block is held to 256
    # (the optimizer's own is ~1500 sequences: a 40-minute run).
    "decode-6.7b-4g": Workload("opt-6.7b", 32, 32, 4, ("accelerate", "flexgen-auto"), peer_batches=(32, 48, 64),
                               flexgen_budget=(1, 2, 60), flexgen_block=(32, 8),
                               note="13.4 GB model, 4 GiB limit, prompt 32, gen 32: decode-heavy"),
    # The decode-heavy length (gen 64) on the same model and limit: a sequence's KV
    # cache is 96 positions, so Accelerate's batch is capped lower than at gen 32. On a CPU
    # both of flexgen's tiers are the same RAM: 1.6 + 1.4 GiB (not 1 + 2) lets the optimizer
    # take gpu batches of 128 rows, whose matmuls run faster than 64's (RESULTS.md).
    "decode-6.7b-g64": Workload("opt-6.7b", 32, 64, 4, ("accelerate", "flexgen-auto"), peer_batches=(48, 64),
                                flexgen_budget=(1.6, 1.4, 60), flexgen_block=(128, 4),
                                note="13.4 GB model, 4 GiB limit, prompt 32, gen 64: decode-heavy"),
    # The paper's ablations (--ablations) on a model larger than its limit, with the KV cache
    # off the compute tier, in runs of minutes: block held to 256 (the optimizer's is ~2000),
    # as 128 x 2 (on two CPU cores a gpu batch of 32 rows runs its matmuls far slower).
    "ablate-1.3b": Workload("opt-1.3b", 32, 16, 2, ("accelerate", "flexgen-auto"), peer_batches=(64, 128, 256),
                            flexgen_budget=(0.6, 0.3, 20), flexgen_block=(128, 2),
                            note="2.6 GB model, 2 GiB limit: ablations"),
    "prefill-6.7b": Workload("opt-6.7b", 512, 8, 8, ("accelerate", "flexgen-auto"), peer_batches=(4, 8, 16),
                             flexgen_budget=(2, 4, 40), note="prefill-heavy"),
    "short-2.7b": Workload("opt-2.7b", 16, 16, 4, ("accelerate", "flexgen-auto"), peer_batches=(32, 64, 128),
                           flexgen_budget=(1, 0.5, 20), note="short prompts, both near compute-bound"),
    "inmem-llama-1b": Workload("llama-1b", 128, 32, None, ("transformers", "flexgen"),
                               note="Llama 3.2 1B's shape (GQA, tied head), random weights, everything fits"),
    "offload-llama-3-8b": Workload("llama-3-8b", 32, 32, 8, ("accelerate", "flexgen-auto"), peer_batches=(8, 16, 32),
                                   flexgen_budget=(2, 4, 40), note="16 GB in bf16, 8 GiB limit"),
    "offload-llama-1.1b": Workload("llama-1.1b", 32, 16, 1.5, ("accelerate", "flexgen-auto"),
                                   # All of flexgen's host memory as the "gpu" tier (RESULTS.md also has a
                                   # run with a 0.5 GiB cpu tier, when the profile took a 2 GiB reserve off it).
                                   flexgen_budget=(0.9, 0, 10), peer_batches=(64, 128, 256, 512),
                                   note="TinyLlama 1.1B's shape, 2.2 GB in bf16 under a 1.5 GiB limit: minutes, not hours"),
    # A model over 6x its limit: Accelerate re-reads ~26 GB per token step for a batch its KV
    # cache caps near 48; flexgen's block held to 128 x 4 (20-40 minutes; the optimizer's
    # own is ~1300 sequences), run with --compress so its optimizer may choose 4-bit.
    "decode-13b-4g": Workload("opt-13b", 32, 32, 4, ("accelerate", "flexgen-auto"), peer_batches=(32, 48),
                              flexgen_budget=(1.6, 1.4, 60), flexgen_block=(128, 4),
                              note="26 GB in bf16 under a 4 GiB limit"),
    # Block held to 128 x 2 and gen to 32 so flexgen's run takes 20 minutes on two cores (the
    # optimizer's own block, ~650 sequences at gen 64, is predicted at 1.4 h); Accelerate was
    # still faster at each larger batch up to 256 (16 to 64: RESULTS.md); about an hour in all.
    "offload-13b": Workload("opt-13b", 32, 32, None, ("accelerate", "flexgen-auto"), peer_batches=(128, 256),
                            flexgen_budget=(8, 8, 60), flexgen_block=(128, 2),
                            note="26 GB in bf16: larger than this machine's RAM, no cgroup"),
}


# One optimisation off (or 4-bit on) at a time, on the optimizer's policy: the paper's ablations.
ABLATIONS = (("overlap=false",), ("num_gpu_batches=1",), ("cpu_cache_compute=false",),
             ("compress_weight=true",), ("compress_cache=true",))


# -- checkpoints --------------------------------------------------------------------

def hf_config(model: str) -> dict:
    from flexgen.models.registry import args_from_name

    if model == "tiny":
        return dict(model_type="opt", architectures=["OPTForCausalLM"], hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, ffn_dim=256, vocab_size=1000, max_position_embeddings=256,
                    word_embed_proj_dim=64, do_layer_norm_before=True, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2, activation_function="relu", enable_bias=True, tie_word_embeddings=True)
    if model == "llama-1b":   # Llama 3.2 1B's shape; not a named size of flexgen's
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    bos_token_id=128000, eos_token_id=128001, pad_token_id=128001)
    if model == "llama-1.1b":   # TinyLlama 1.1B's shape: Llama 2 layout, GQA 32:4, 32k vocab
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                    max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg = args_from_name(model).to_hf_config()
    cfg.setdefault("model_type", "opt")
    cfg.setdefault("architectures", ["OPTForCausalLM"])
    return cfg


def write_checkpoint(model: str, directory: Path, dtype: str = "bfloat16", shard_bytes: int = 2 * GIB) -> Path:
    """A random Hugging Face checkpoint, written one shard at a time. Norm weights are one
    and biases zero, as a trained model's are near, so activations stay sane."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    cfg_dict = hf_config(model)
    config = AutoConfig.for_model(**cfg_dict)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tdtype = getattr(torch, dtype)
    params = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()
              if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    need = sum(int(torch.Size(s).numel()) for _, s in params) * tdtype.itemsize
    free = shutil.disk_usage(directory).free
    if need * 1.05 > free:
        raise SystemExit(f"compare: {model} needs {need / GIB:.1f} GiB under {directory}, {free / GIB:.1f} free "
                         "(and flexgen's weight store as much again); use --ckpt-dir on a larger disk")
    g = torch.Generator().manual_seed(0)
    tmp = directory / ".partial"
    tmp.mkdir(exist_ok=True)
    shard, size, n_shard, weight_map = {}, 0, 0, {}

    def flush():
        nonlocal shard, size, n_shard
        if shard:
            n_shard += 1
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in params:
        if name.endswith("bias"):
            t = torch.zeros(shape, dtype=tdtype)
        elif len(shape) == 1:   # norm weights
            t = torch.ones(shape, dtype=tdtype)
        else:
            t = (torch.randn(shape, generator=g) * 0.02).to(tdtype)
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    for f in tmp.iterdir():
        f.rename(directory / f.name)
    tmp.rmdir()
    (directory / "config.json").write_text(json.dumps({**cfg_dict, "torch_dtype": dtype}, indent=2))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": need}, "weight_map": weight_map}, indent=1))
    return directory


# -- the child: one system, one batch ---------------------------------------------------

class FirstTokenClock:
    """A generate() streamer: the second put() is the first new token (end of prefill)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def kv_cache_bytes(ckpt: Path, batch: int, tokens: int, itemsize: int = 2) -> int:
    """Bytes of a batch's keys and values at `tokens` positions (grouped-query heads counted)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    heads = cfg.get("num_attention_heads", 1)
    kv_width = cfg["hidden_size"] * cfg.get("num_key_value_heads", heads) // heads
    return 2 * cfg["num_hidden_layers"] * kv_width * tokens * batch * itemsize


def peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(a) -> dict:
    import torch

    torch.manual_seed(0)
    cfg = json.loads((Path(a.ckpt) / "config.json").read_text())
    ids = torch.randint(4, cfg["vocab_size"] - 1, (a.batch, a.prompt_len), generator=torch.Generator().manual_seed(1))
    dtype = getattr(torch, a.dtype)
    out = {"system": a.system, "batch": a.batch}
    if a.system == "verify":
        return teacher_forced_check(a, ids, dtype)
    if a.system in ("transformers", "accelerate"):
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        kw = {}
        if a.system == "accelerate":
            kw = dict(device_map="auto", max_memory={"cpu": int(a.peer_weight_budget * GIB)},
                      offload_folder=a.offload_dir, offload_state_dict=True)
        model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=dtype, **kw).eval()
        out["load_s"] = time.perf_counter() - t0
        if a.system == "accelerate":
            placed = getattr(model, "hf_device_map", {})
            out["device_map"] = {d: sum(1 for v in placed.values() if v == d) for d in set(placed.values())}
        clock = FirstTokenClock()
        with torch.no_grad():
            t0 = time.perf_counter()
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.gen_len,
                                 min_new_tokens=a.gen_len, do_sample=False, pad_token_id=cfg.get("pad_token_id", 1),
                                 streamer=clock)
            t1 = time.perf_counter()
        out["prefill_s"] = (clock.first or t1) - t0
        out["decode_s"] = t1 - (clock.first or t1)
        out["generated_tokens"] = (seq.shape[1] - a.prompt_len) * a.batch
        out["tokens"] = seq[:, a.prompt_len:].tolist()
    else:
        import flexgen
        from flexgen.autopolicy import choose_policy
        from flexgen.optimizer.cli import model_args_for

        if a.system == "flexgen-auto":
            gpu, cpu, disk = a.budget
            gbs, ngb = a.block or (None, None)
            policy, est, _ = choose_policy(model_args_for(a.ckpt), a.prompt_len, a.gen_len,
                                        offload_dir=Path(a.offload_dir), gpu_mem=gpu, cpu_mem=cpu, disk_mem=disk,
                                        gpu_batch_size=gbs, num_gpu_batches=ngb,
                                        hardware=a.hardware, compress_weight=a.compress, compress_cache=a.compress,
                                        log=lambda m: None)
            out["predicted_tok_s"] = est.throughput
            if a.compress:
                out["system"] = "flexgen-auto (4-bit allowed)"
        else:
            p = a.policy_percent
            policy = flexgen.Policy(gpu_batch_size=a.policy_gbs, num_gpu_batches=a.policy_ngb,
                                    w_gpu_percent=p[0], w_cpu_percent=p[1], cache_gpu_percent=p[2],
                                    cache_cpu_percent=p[3], act_gpu_percent=p[4], act_cpu_percent=p[5])
        if a.modify:
            import dataclasses
            changes = {}
            for item in a.modify:
                key, value = item.split("=", 1)
                changes[key] = {"true": True, "false": False}.get(value.lower(), None)
                if changes[key] is None:
                    changes[key] = int(value) if value.isdigit() else float(value)
            policy = dataclasses.replace(policy, **changes)
            out["system"] = f"{a.system} ({', '.join(a.modify)})"
        if a.label:
            out["system"] = a.label
        out["policy"] = policy.to_dict()
        out["batch"] = policy.block_size
        ids = torch.randint(4, cfg["vocab_size"] - 1, (policy.block_size, a.prompt_len),
                            generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        with flexgen.load_model(a.ckpt, policy, device="cpu", dtype=dtype, offload_dir=a.offload_dir) as m:
            out["load_s"] = time.perf_counter() - t0
            seq = m.generate(ids, max_new_tokens=a.gen_len, eos_token_id=[])
            out["tokens"] = seq[:, a.prompt_len:].tolist()
            s = m.stats
            out.update(prefill_s=s.prefill_time, decode_s=s.decode_time, generated_tokens=s.generated_tokens,
                       timings=dict(s.timings), peak_memory=dict(s.peak_memory), direct_io=s.direct_io,
                       disk_read={"prefill": s.disk_read_bytes - s.decode_disk_read_bytes,
                                  "decode": s.decode_disk_read_bytes})
        from flexgen.autopolicy import hardware_profile
        hw = hardware_profile(a.hardware, Path(a.offload_dir), log=lambda m: None)
        out["bound"] = phase_bounds(a.ckpt, policy, a.prompt_len, a.gen_len, hw)
    out["total_s"] = out["prefill_s"] + out["decode_s"]
    out["throughput"] = out["generated_tokens"] / out["total_s"] if out["total_s"] else 0.0
    out["peak_rss"] = peak_rss()
    return out


def teacher_forced_check(a, ids, dtype) -> dict:
    """Greedy tokens of two correct systems part ways at near-ties (a random model's top
    logits are often one bf16 step apart), after which whole rows differ. So, in addition
    to exact agreement, feed flexgen's tokens to transformers and ask, at every generated
    position, whether flexgen picked transformers' argmax, and by how much it fell short."""
    import torch
    from transformers import AutoModelForCausalLM

    fg = torch.tensor(json.loads(Path(a.tokens_file).read_text()))
    model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=dtype).eval()
    seq = torch.cat([ids[:fg.shape[0]], fg], 1)
    short = []
    with torch.no_grad():
        for r0 in range(0, seq.shape[0], 8):
            logits = model(seq[r0:r0 + 8]).logits[:, a.prompt_len - 1:-1].float()   # predicts fg
            picked = logits.gather(-1, fg[r0:r0 + 8, :, None])[..., 0]
            short.append(logits.max(-1).values - picked)
    short = torch.cat(short)
    return {"system": "verify", "argmax_share": (short == 0).float().mean().item(),
            "max_shortfall": short.max().item(), "positions": short.numel()}


def phase_bounds(ckpt, policy, prompt_len: int, gen_len: int, hw) -> dict:
    """Per phase, the time no schedule can beat on hardware profile `hw`: the busiest
    resource (each link's bytes / its measured bandwidth, matmul FLOPs / the measured
    rate, host attention), from the cost model's accounting of this policy."""
    from flexgen.optimizer.cost_model import estimate
    from flexgen.optimizer.cli import model_args_for

    est = estimate(model_args_for(ckpt), policy, prompt_len, gen_len, hw)
    out = {}
    for phase, busy in est.busy_time.items():
        resource = max(busy, key=busy.get)
        out[phase] = {"seconds": busy[resource], "resource": resource, "busy": dict(busy)}
    out["predicted_tok_s"] = est.throughput
    out["disk_read_bw"] = hw.disk_read_bw
    return out


# -- the parent: cgroups, page cache, the table -----------------------------------------

class MemoryCgroup:
    """A memory cgroup (v1, else v2) whose limit counts RSS and page cache; None if none can be made."""

    def __init__(self, limit: int):
        self.path = None
        name = f"flexgen-compare-{os.getpid()}"
        for root, limit_file, peak_file in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes",
                                             "memory.max_usage_in_bytes"),
                                            ("/sys/fs/cgroup", "memory.max", "memory.peak")):
            try:
                p = Path(root) / name
                p.mkdir(exist_ok=True)
                (p / limit_file).write_text(str(limit))
                if limit_file == "memory.limit_in_bytes":
                    try:
                        (p / "memory.memsw.limit_in_bytes").write_text(str(limit))
                    except OSError:
                        pass   # no swap accounting: there is no swap here anyway
                self.path, self.peak_file = p, peak_file
                return
            except OSError:
                continue

    def preexec(self):
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> Optional[int]:
        try:
            return int((self.path / self.peak_file).read_text())
        except (OSError, ValueError, TypeError):
            return None

    def close(self, wait_s: float = 5.0):
        """Remove the cgroup, retrying briefly; if it stays busy, name it on stderr rather
        than fail a long run at its end."""
        if self.path is not None:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    self.path.rmdir()
                    return
                except OSError as e:
                    if time.monotonic() >= deadline:
                        print(f"compare: could not remove the memory cgroup {self.path} ({e.strerror}); "
                              "remove it with rmdir once it is idle", file=sys.stderr)
                        return
                    time.sleep(0.2)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_child(args: list, limit_gib: Optional[float], timeout: float) -> dict:
    cg = MemoryCgroup(int(limit_gib * GIB)) if limit_gib else None
    if limit_gib and cg.path is None:
        print("compare: cannot make a memory cgroup here (not root, or no memory controller); running without "
              "a limit: only a model larger than RAM is then an honest offloading case", file=sys.stderr)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_json = f.name
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__)), "child", "--out", out_json, *args],
                              preexec_fn=cg.preexec if cg else None, capture_output=True, text=True, timeout=timeout)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, err = "timeout", ""
    except BaseException:
        # Ctrl-C or SIGTERM: subprocess.run has killed and reaped the child; leave nothing.
        Path(out_json).unlink(missing_ok=True)
        if cg:
            cg.close()
        raise
    wall = time.perf_counter() - t0
    peak = cg.peak() if cg else None
    if cg:
        cg.close()
    try:
        res = json.loads(Path(out_json).read_text())
    except (OSError, json.JSONDecodeError):
        reason = "killed by the cgroup's OOM killer" if rc == -9 else f"exit {rc}"
        # A kill leaves stderr's last line unrelated (a warning while loading): say only why.
        tail = [line for line in err.strip().splitlines() if line.strip()][-1:] if err and rc != -9 else []
        res = {"failed": f"{reason}{': ' + tail[0][:160] if tail else ''}"}
        res["system"] = args[args.index("--system") + 1]
    finally:
        Path(out_json).unlink(missing_ok=True)
    res.update(wall_s=wall, cgroup_peak=peak)
    return res


def mean_profile(profiles: list):
    """The field-wise mean of hardware profiles of one machine: every rate (and the matmul
    rate of each row count all of them measured); names and capacities from the first."""
    import dataclasses

    first = profiles[0]
    mean = {}
    for f in dataclasses.fields(first):
        values = [getattr(p, f.name) for p in profiles]
        if isinstance(values[0], float):
            mean[f.name] = sum(values) / len(values)
    tables = [dict(p.gpu_matmul_by_rows) for p in profiles]
    rows = sorted(set.intersection(*(set(t) for t in tables)))
    mean["gpu_matmul_by_rows"] = tuple((r, sum(t[r] for t in tables) / len(tables)) for r in rows)
    return dataclasses.replace(first, **mean)


def rates_now(scratch: Path):
    """This machine's profile measured now (about 20 s on two cores), in the parent: the
    child's cgroup does not hold it, and no run is going on beside it."""
    from flexgen.calibrate import measure_hardware
    return measure_hardware(scratch / "rates-probe", device="cpu")


def run_flexgen(args: list, a, w, ckpt: Path, scratch: Path) -> dict:
    """A flexgen row; with --measure-rates, the machine's rates are measured just before and
    just after it, and its bound is also given with their mean ("bound_now"). This host's
    matmul rate at 128 rows read 1.04, 0.89 and 1.13 TFLOP/s in profiles hours apart, so a
    bound from a profile measured earlier can be off by more than the gap it judges."""
    if not a.measure_rates:
        return run_child(args, w.limit_gib, a.timeout)
    from flexgen import Policy
    before = rates_now(scratch)
    drop_page_cache()
    r = run_child(args, w.limit_gib, a.timeout)
    if "policy" in r:
        hw = mean_profile([before, rates_now(scratch)])
        r["bound_now"] = phase_bounds(str(ckpt), Policy.from_dict(r["policy"]), w.prompt_len, w.gen_len, hw)
        r["rates_now"] = {"matmul_by_rows": [list(x) for x in hw.gpu_matmul_by_rows],
                          "disk_read_bw": hw.disk_read_bw, "dequant_rate": hw.gpu_dequant_rate,
                          "quant_rate": hw.gpu_quant_rate, "packed_attn_rate": hw.cpu_packed_attn_rate}
    return r


def still_rising(tried: dict) -> bool:
    """Whether, of two or more batches tried ({batch: token/s or failure}), the fastest is the largest."""
    ok = {int(b): v for b, v in tried.items() if isinstance(v, (int, float))}
    return len(tried) > 1 and len(ok) > 0 and max(ok, key=ok.get) == max(int(b) for b in tried)


def machine() -> dict:
    cpu, isa = platform.processor(), []
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        # Hosts with this same model name have run bf16 matmuls at 165 and at 870 GFLOP/s on two
        # cores: record the bf16 instructions, so figures from different hosts are told apart.
        flags = next(line.split(":", 1)[1].split() for line in info if line.startswith("flags"))
        isa = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = None
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": cpu, "bf16_isa": isa, "cores": os.cpu_count(), "ram_gib": round(mem / GIB, 1), "gpu": gpu,
            "python": platform.python_version()}


def accelerate_placement(peer: dict) -> list:
    """Child arguments for flexgen with the placement Accelerate chose at its best batch: the
    share of modules it kept in memory as weights on the compute device's tier (on a CPU that
    is host memory either way), the rest on disk, the KV cache and activations in memory, one
    batch of Accelerate's size (no block schedule). Modules are counted, not bytes: the
    decoder layers, nearly all of the bytes, are of one size. No device map means Accelerate
    kept the whole model in memory."""
    placed = peer.get("device_map") or {"cpu": 1}
    in_memory = 100.0 * sum(n for d, n in placed.items() if d != "disk") / sum(placed.values())
    return ["--system", "flexgen", "--label", "flexgen (Accelerate's placement)",
            "--policy-percent", f"{in_memory:.1f}", "0", "100", "0", "100", "0",
            "--policy-gbs", str(peer["batch"]), "--policy-ngb", "1"]


def token_agreement(rows) -> Optional[float]:
    """Share of equal generated tokens between transformers and fixed-policy flexgen at one batch."""
    hf = next((r for r in rows if r.get("system") == "transformers" and "tokens" in r), None)
    fg = next((r for r in rows if r.get("system") == "flexgen" and "tokens" in r), None)
    if hf is None or fg is None or len(hf["tokens"]) != len(fg["tokens"]):
        return None
    pairs = [(x, y) for a, b in zip(hf["tokens"], fg["tokens"]) for x, y in zip(a, b)]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else None


def _fmt_gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        ap = argparse.ArgumentParser()
        ap.add_argument("--out", required=True)
        ap.add_argument("--system", required=True)
        ap.add_argument("--ckpt", required=True)
        ap.add_argument("--batch", type=int, default=1)
        ap.add_argument("--prompt-len", type=int, required=True)
        ap.add_argument("--gen-len", type=int, required=True)
        ap.add_argument("--dtype", default="bfloat16")
        ap.add_argument("--offload-dir", required=True)
        ap.add_argument("--peer-weight-budget", type=float, default=0)
        ap.add_argument("--budget", type=float, nargs=3)
        ap.add_argument("--block", type=int, nargs=2, help="flexgen-auto: gpu batch size and gpu batches")
        ap.add_argument("--hardware")
        ap.add_argument("--compress", action="store_true")
        ap.add_argument("--policy-percent", type=float, nargs=6, default=[100, 0, 100, 0, 100, 0])
        ap.add_argument("--policy-gbs", type=int, default=8)
        ap.add_argument("--policy-ngb", type=int, default=1)
        ap.add_argument("--modify", nargs="*", default=[], help="policy field=value changes (ablations)")
        ap.add_argument("--tokens-file", help="verify: flexgen's generated tokens (JSON)")
        ap.add_argument("--label", help="the row's system name in the table")
        a = ap.parse_args(argv[1:])
        Path(a.out).write_text(json.dumps(child(a)))
        return 0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="smoke", choices=sorted(WORKLOADS))
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    ap.add_argument("--ckpt-dir", default=str(Path(tempfile.gettempdir()) / "flexgen-compare"),
                    help="where the random checkpoints are written (kept for later runs)")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of every system (default bfloat16)")
    ap.add_argument("--hardware", help="hardware profile for flexgen-auto (default: this machine's)")
    ap.add_argument("--policy-percent", type=float, nargs=6, default=[100, 0, 100, 0, 100, 0])
    ap.add_argument("--policy-gbs", type=int, help="default: the workload's largest peer batch")
    ap.add_argument("--policy-ngb", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, help="override the workload's prompt length")
    ap.add_argument("--gen-len", type=int, help="override the workload's generation length (e.g. a shorter run)")
    ap.add_argument("--peer-batches", type=int, nargs="+", help="override the batch sizes tried for Accelerate")
    ap.add_argument("--block", type=int, nargs=2, metavar=("GBS", "NGB"),
                    help="override the block flexgen-auto is held to (gpu batch size, gpu batches)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per system run")
    ap.add_argument("--systems", nargs="+", help="run only these of the workload's systems")
    ap.add_argument("--compress", action="store_true",
                    help="let flexgen-auto's optimizer choose 4-bit weights and / or a 4-bit KV cache")
    ap.add_argument("--modify", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="change flexgen-auto's chosen policy (e.g. compress_cache=true)")
    ap.add_argument("--ablations", action="store_true",
                    help="also run the optimizer's policy with one optimisation off (or 4-bit on) at a time")
    ap.add_argument("--json-out", help="write all figures as JSON")
    ap.add_argument("--measure-rates", action="store_true",
                    help="measure this machine's rates just before and after each flexgen run (about 20 s "
                         "each) and also give its bound with their mean")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    a = ap.parse_args(argv)
    if a.list:
        for name, w in WORKLOADS.items():
            print(f"{name:<14} {w.model:<9} prompt {w.prompt_len:<4} gen {w.gen_len:<3} limit "
                  f"{w.limit_gib or '-'} GiB  {', '.join(w.systems)}  ({w.note})")
        return 0
    w = WORKLOADS[a.workload]
    if a.block and min(a.block) < 1:
        ap.error(f"--block: gpu batch size and gpu batches must be >= 1, got {a.block[0]} {a.block[1]}")
    unknown = set(a.systems or ()) - set(w.systems)
    if unknown:
        ap.error(f"--systems: {', '.join(sorted(unknown))} not in workload {a.workload} ({', '.join(w.systems)})")
    w = replace(w, prompt_len=a.prompt_len or w.prompt_len, gen_len=a.gen_len or w.gen_len,
                peer_batches=tuple(a.peer_batches or w.peer_batches),
                flexgen_block=tuple(a.block or w.flexgen_block),
                systems=tuple(x for x in w.systems if x in (a.systems or w.systems)))
    from flexgen.autopolicy import available_memory

    # SIGTERM / SIGHUP unwind like Ctrl-C: subprocess.run kills the running child and the
    # scratch directory below (the peer's checkpoint, flexgen's weight store: tens of GB)
    # is removed. Killed outright, the 13B runs left 27 GB behind and filled the disk.
    import signal

    from flexgen.cli import _raise_terminated
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_terminated)
    ckpt = write_checkpoint(w.model, Path(a.ckpt_dir) / w.model, a.dtype)
    scratch = Path(tempfile.mkdtemp(prefix="compare-", dir=a.ckpt_dir))
    dropped = drop_page_cache()
    base = ["--ckpt", str(ckpt), "--prompt-len", str(w.prompt_len), "--gen-len", str(w.gen_len), "--dtype", a.dtype,
            "--offload-dir", str(scratch)]
    rows = []
    try:
        for system in w.systems:
            if system in ("transformers", "accelerate"):
                batches = w.peer_batches if system == "accelerate" else (w.peer_batches[-1],)
                tried = []
                for b in batches:
                    # Accelerate's max_memory bounds the weights it keeps in RAM; the rest of the
                    # limit is left for activations, Python + torch (~0.6 GB) and the batch's KV
                    # cache, which a larger batch takes from the weights (they go to disk instead).
                    kv = kv_cache_bytes(ckpt, b, w.prompt_len + w.gen_len) / GIB
                    # With no limit, max_memory is what a careful user would give: 80 % of the RAM
                    # available once the page cache is dropped (an unbounded budget would place a
                    # model larger than RAM wholly in RAM).
                    room = w.limit_gib * 0.6 if w.limit_gib else available_memory() / GIB * 0.8
                    budget = max(0.1, room - kv)
                    drop_page_cache()
                    tried.append(run_child(base + ["--system", system, "--batch", str(b),
                                                   "--peer-weight-budget", str(budget)], w.limit_gib, a.timeout))
                    shutil.rmtree(scratch / "peer", ignore_errors=True)
                ok = [r for r in tried if "failed" not in r]
                best = max(ok, key=lambda r: r["throughput"]) if ok else tried[-1]
                best["tried"] = {str(r.get("batch", b)): (round(r["throughput"], 3) if "failed" not in r
                                                          else r["failed"]) for b, r in zip(batches, tried)}
                rows.append(best)
            else:
                drop_page_cache()
                extra = ["--system", system]
                if system == "flexgen-auto":
                    extra += ["--budget", *map(str, w.flexgen_budget)]
                    if w.flexgen_block:
                        extra += ["--block", *map(str, w.flexgen_block)]
                    if a.modify:
                        extra += ["--modify", *a.modify]
                    if a.compress:
                        extra += ["--compress"]
                    if a.hardware:
                        extra += ["--hardware", a.hardware]
                else:
                    gbs = a.policy_gbs or w.peer_batches[-1]
                    extra += ["--policy-percent", *map(str, a.policy_percent), "--policy-gbs", str(gbs),
                              "--policy-ngb", str(a.policy_ngb)]
                rows.append(run_flexgen(base + extra, a, w, ckpt, scratch))
        if a.ablations:
            for change in ABLATIONS:
                drop_page_cache()
                extra = ["--system", "flexgen-auto", "--budget", *map(str, w.flexgen_budget), "--modify", *change]
                if w.flexgen_block:
                    extra += ["--block", *map(str, w.flexgen_block)]
                if a.hardware:
                    extra += ["--hardware", a.hardware]
                rows.append(run_flexgen(base + extra, a, w, ckpt, scratch))
            peer = next((r for r in rows if r.get("system") == "accelerate" and "failed" not in r), None)
            if peer is not None:
                drop_page_cache()
                rows.append(run_child(base + accelerate_placement(peer), w.limit_gib, a.timeout))
        forced = None
        fg = next((r for r in rows if r.get("system") == "flexgen" and "tokens" in r), None)
        if "transformers" in w.systems and fg is not None:
            tokens_file = scratch / "flexgen-tokens.json"
            tokens_file.write_text(json.dumps(fg["tokens"]))
            drop_page_cache()
            forced = run_child(base + ["--system", "verify", "--batch", str(fg["batch"]),
                                       "--tokens-file", str(tokens_file)], w.limit_gib, a.timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    agree = token_agreement(rows)
    ref = next((r["throughput"] for r in rows if r.get("system", "").startswith("flexgen") and "failed" not in r),
               None)
    head = (f"workload {a.workload}: {w.model} ({a.dtype}), prompt {w.prompt_len}, gen {w.gen_len}, memory limit "
            f"{w.limit_gib or 'none'} GiB (RSS + page cache), page cache dropped between systems: "
            f"{'yes' if dropped else 'no (not root)'}")
    lines = [head, "",
             "| system | batch (block) | placement | prefill s | decode s | token/s | of bound (prefill / decode) | "
             + ("of bound, rates measured around the run | " if a.measure_rates else "")
             + "peak RSS GiB | peak RSS+cache GiB | vs flexgen |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if a.measure_rates else "")]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r.get('system', '?')} | - | - | - | - | failed: {r['failed']} | - | - | - | - |"
                         + (" - |" if a.measure_rates else ""))
            continue
        if "policy" in r:
            p = r["policy"]
            place = (f"{p['gpu_batch_size']}x{p['num_gpu_batches']}, " + " ".join(
                f"{p[k]:g}" for k in ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                                      "act_gpu_percent", "act_cpu_percent")))
            place += "".join(f", 4-bit {what}" for what in ("weight", "cache") if p.get(f"compress_{what}"))
        else:
            place = ", ".join(f"{k}: {v}" for k, v in sorted(r.get("device_map", {}).items())) or "in memory"
        ratio = f"{r['throughput'] / ref:.2f}" if ref else "-"
        def of_bound(b) -> str:
            return " / ".join(f"{b[ph]['seconds'] / max(r[ph + '_s'], 1e-9):.0%} ({b[ph]['resource']})"
                              for ph in ("prefill", "decode") if ph in b) if b else "-"
        bound = of_bound(r.get("bound")) + (f" | {of_bound(r.get('bound_now'))}" if a.measure_rates else "")
        lines.append(f"| {r['system']} | {r['batch']} | {place} | {r['prefill_s']:.2f} | {r['decode_s']:.2f} | "
                     f"{r['throughput']:.3f} | {bound} | {_fmt_gib(r['peak_rss'])} | {_fmt_gib(r['cgroup_peak'])} | "
                     f"{ratio} |")
    from flexgen.cli import time_breakdown
    for r in rows:   # where the time went, for a phase well below its bound
        for ph in ("prefill", "decode"):
            b, t = r.get("bound", {}).get(ph), r.get("timings", {})
            if not b or "failed" in r or b["seconds"] >= 0.7 * r[ph + "_s"]:
                continue
            busy = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(b["busy"].items(), key=lambda kv: -kv[1])[:3])
            read = r.get("disk_read", {}).get(ph, 0)
            profile = r["bound"].get("disk_read_bw")
            lines.append(f"\n{r['system']} {ph}: {b['seconds'] / r[ph + '_s']:.0%} of its bound; measured "
                         f"{r[ph + '_s']:.1f} s = {time_breakdown(t, ph, read)}"
                         + (f" (the profile's: {profile / 1e9:.2f} GB/s)" if read and profile else "")
                         + f"; the model's busiest resources: {busy}")
    for r in rows:
        if "tried" in r:
            lines.append(f"\n{r['system']} throughput by batch: " + ", ".join(f"{b}: {v}" for b, v in r["tried"].items()))
            if still_rising(r["tried"]):
                lines.append(f"{r['system']}: its best batch is the largest tried; a larger one may be faster "
                             "(try --peer-batches with larger sizes)")
    if agree is not None:
        lines.append(f"\ntoken agreement transformers vs flexgen (same weights, prompts and batch): {agree:.1%}")
    if forced is not None and "failed" not in forced:
        lines.append(f"teacher-forced: at {forced['argmax_share']:.1%} of {forced['positions']} generated positions "
                     "flexgen's token is transformers' argmax given the same prefix; largest logit shortfall "
                     f"{forced['max_shortfall']:.4f}")
    for r in rows:
        r.pop("tokens", None)
    table = "\n".join(lines)
    print(table)
    mach = machine()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"workload": asdict(w), "rows": rows, "token_agreement": agree, "teacher_forced": forced, "machine": mach, "date": when},
                                               indent=2, default=str))
    if a.record:
        cmd = "python benchmarks/compare.py " + " ".join(argv)
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(f"\n## compare.py: {a.workload}\n\n- command: `{cmd}`\n- machine: {mach['cpu']}, {mach['cores']} "
                    f"cores, {', '.join(mach.get('bf16_isa') or ['no bf16 matmul instructions'])}, "
                    f"{mach['ram_gib']} GiB RAM, GPU {mach['gpu'] or 'none'}\n- date: {when}\n\n{table}\n")
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
