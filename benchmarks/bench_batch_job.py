"""What mixed prompt lengths cost a batch job: `flexgen.LLM` against fixed-length runs.

A JSONL file of --num-prompts prompts whose lengths are spread uniformly over
[--min-len, --max-len] tokens is read and generated with `flexgen.LLM` (grouped by length
into blocks, left-padded within a block, last block partial). The same engine and policy
then generate the same number of sequences at one fixed prompt length, the mean of the
mixed lengths (rounded up), so both runs process the same prompt and generated tokens.
Prints both throughputs (generated tokens / wall time) and their ratio: what padding,
bucketing and the last partial block cost. Target: at least 0.85.

A dummy OPT (random weights, no tokenizer: prompts are token ids) runs wholly in memory,
EOS ignored so that every sequence generates --gen-len tokens in both runs. The two
systems alternate for --repeat rounds; the best of each is reported.

    python benchmarks/bench_batch_job.py [--model opt-125m] [--num-prompts 500] [--gen-len 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import tempfile
import time

import torch

import flexgen
from flexgen import LLM, Policy, SamplingParams
from flexgen.device import dtype_name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-125m")
    ap.add_argument("--num-prompts", type=int, default=500)
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--gpu-batch-size", type=int, default=32)
    ap.add_argument("--num-gpu-batches", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--json-out")
    a = ap.parse_args()

    rng = random.Random(0)
    workdir = tempfile.mkdtemp(prefix="flexgen-batch-")
    path = os.path.join(workdir, "prompts.jsonl")
    with open(path, "w") as f:   # the job's input, as a user would have it
        for i in range(a.num_prompts):
            n = rng.randint(a.min_len, a.max_len)
            f.write(json.dumps({"id": i, "prompt": [rng.randrange(4, 50000) for _ in range(n)]}) + "\n")
    with open(path) as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    lengths = [len(p) for p in prompts]
    fixed_len = math.ceil(sum(lengths) / len(lengths))
    fixed = torch.randint(4, 50000, (a.num_prompts, fixed_len), generator=torch.Generator().manual_seed(1))
    policy = Policy(gpu_batch_size=a.gpu_batch_size, num_gpu_batches=a.num_gpu_batches)
    params = SamplingParams(max_new_tokens=a.gen_len, ignore_eos=True)

    best = {"mixed": 0.0, "fixed": 0.0}
    figures = {}
    with LLM(a.model, policy, dummy=True, dtype=a.dtype, offload_dir=os.path.join(workdir, "offload"),
             progress=False) as llm:
        llm.generate(prompts[:policy.block_size], params, progress=False)   # warm-up
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, progress=False)
            dt = time.perf_counter() - t0
            tokens = sum(len(o.token_ids) for o in outs)
            best["mixed"] = max(best["mixed"], tokens / dt)
            padded = sum(o.block.prompt_len for o in outs)
            figures["mixed"] = dict(seconds=dt, tokens=tokens, blocks=len({o.block.index for o in outs}),
                                    prompt_tokens=sum(lengths), padded_prompt_tokens=padded)
            t0 = time.perf_counter()
            out = llm.model.generate(fixed, max_new_tokens=a.gen_len, eos_token_id=[])
            dt = time.perf_counter() - t0
            tokens = (out.shape[1] - fixed_len) * a.num_prompts
            best["fixed"] = max(best["fixed"], tokens / dt)
            figures["fixed"] = dict(seconds=dt, tokens=tokens, prompt_tokens=fixed_len * a.num_prompts)
        dtype = dtype_name(llm.model.dtype)
    ratio = best["mixed"] / best["fixed"]
    pad = 1 - figures["mixed"]["prompt_tokens"] / figures["mixed"]["padded_prompt_tokens"]
    print(f"model {a.model} (dummy, {dtype}), {a.num_prompts} prompts of {a.min_len}..{a.max_len} tokens "
          f"(mean {sum(lengths) / len(lengths):.1f}), gen {a.gen_len}, block {policy.gpu_batch_size} x "
          f"{policy.num_gpu_batches}, torch threads {torch.get_num_threads()}")
    print(f"{'run':<28} {'token/s':>10}")
    print(f"{'mixed lengths (LLM, JSONL)':<28} {best['mixed']:>10.2f}")
    print(f"{'fixed length ' + str(fixed_len):<28} {best['fixed']:>10.2f}")
    print(f"ratio mixed / fixed: {ratio:.3f} (target >= 0.85); prompt padding {pad:.1%} of the padded "
          f"prompt tokens, {figures['mixed']['blocks']} blocks")
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                  machine=f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
                  torch=torch.__version__, flexgen=flexgen.__version__, args=vars(a), best=best, ratio=ratio,
                  padding=pad, figures=figures)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
