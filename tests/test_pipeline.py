"""Pipeline stages on torch.distributed (gloo, processes on this machine): the same greedy
tokens as the single-process engine, and a dead rank ends the others."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import torch

import flexgen
from flexgen import Policy
from flexgen.errors import FlexGenError
from flexgen.stages import micro_batch_groups, split_layers

GEN = 6


def P(wg=100, wc=0, cg=100, cc=0, hg=100, hc=0, **kw):
    kw.setdefault("gpu_batch_size", 2)
    return Policy(w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc,
                  act_gpu_percent=hg, act_cpu_percent=hc, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, path, offload, cases, ids, mask, out_dir, die_after=None, how=signal.SIGKILL,
            timeout_s=30):
    """One stage: every case with its own (per-rank) policy; results to out_dir/rank.pt."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=timeout_s))
    results = []
    try:
        for policies, kw, *other in cases:   # other: a checkpoint other than `path`
            policy = policies[rank % len(policies)]
            with flexgen.load_model(str(other[0] if other else path), policy, device="cpu", dtype=torch.float32, offload_dir=offload) as m:
                if die_after is not None and rank == die_after:
                    os.kill(os.getpid(), how)
                results.append(m.generate(ids, mask, max_new_tokens=GEN, **kw))
    except FlexGenError as e:
        with open(os.path.join(out_dir, f"error-{rank}.txt"), "w") as f:
            f.write(str(e))
        raise SystemExit(3)
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def _spawn(world, *args, die_after=None, timeout=120, wait_for=None, **kw):
    """Run `world` workers; wait for the ranks in wait_for (default all), kill the rest."""
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, *args), kwargs={"die_after": die_after, **kw})
             for r in range(world)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    waited = [procs[r] for r in (range(world) if wait_for is None else wait_for)]
    while any(p.is_alive() for p in waited) and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    return [p.exitcode for p in procs], alive


@pytest.fixture(scope="module")
def deep_opt(tmp_path_factory):
    from conftest import make_checkpoint
    d = tmp_path_factory.mktemp("opt-3l")
    model = make_checkpoint(d, layers=3, tokenizer=False, seed=4)
    return d, model


def _reference(path, policy, ids, mask, offload, kw, other=None):
    path = other or path
    with flexgen.load_model(str(path), policy, device="cpu", dtype=torch.float32, offload_dir=offload) as m:
        return m.generate(ids, mask, max_new_tokens=GEN, **kw)


def test_split_layers_contiguous_balanced():
    costs = [10, 1, 4, 1, 4, 1, 4, 10]
    for n in (1, 2, 3, len(costs)):
        s = split_layers(costs, n)
        assert len(s) == n and s[0].start == 0 and s[-1].stop == len(costs)
        assert all(a.stop == b.start and a.stop > a.start for a, b in zip(s, s[1:]))
    assert split_layers(costs, 2) == [slice(0, 5), slice(5, 8)]
    assert [len(g) for g in micro_batch_groups(4, 3)] == [1, 2, 1] and micro_batch_groups(1, 3) == [range(0, 1)]


@pytest.mark.parametrize("world", [2, 3])
def test_stages_match_single_process(deep_opt, prompts, tmp_path, world):
    """Per stage, weights / cache / hidden on different tiers; ngb 1, 2 and 4 (so 1 or
    more gpu batches per group); 4-bit weights and cache; early stop by EOS and by a
    stop sequence."""
    path, model = deep_opt
    ids, mask = prompts
    offload = tmp_path / "offload"
    P0 = ids.shape[1]
    if world == 2:
        from test_families import make_family_checkpoint
        llama = tmp_path / "llama"
        make_family_checkpoint(llama, "llama", seed=1, num_key_value_heads=2, num_hidden_layers=3)
    ref = _reference(path, P(), ids, mask, offload, {"eos_token_id": []})
    eos_all = sorted({int(t) for t in ref[:, P0 + 1]})      # every row stops at its 2nd token
    stop = ref[1, P0 + 1:P0 + 3].tolist()
    tiers = ([P(0, 0), P(cg=0, cc=0, hg=0, hc=0), P(30, 30, 30, 30, 30, 30)], {"eos_token_id": []})
    if world == 2:
        cases = [
            tiers,
            ([P(0, 0, 0, 0, 0, 0, gpu_batch_size=1, num_gpu_batches=4, overlap=False),
              P(0, 50, 0, 50, 50, 0, gpu_batch_size=1, num_gpu_batches=4)], {"eos_token_id": []}),
            ([P(50, 0, 50, 0, compress_weight=True, compress_cache=True, num_gpu_batches=2),
              P(0, 50, 0, 50, compress_weight=True, compress_cache=True, num_gpu_batches=2)], {"eos_token_id": []}),
            ([P(num_gpu_batches=2), P(0, 0, 0, 0, num_gpu_batches=2)], {"eos_token_id": eos_all}),
            ([P(num_gpu_batches=2), P(0, 50, cg=0, cc=100, num_gpu_batches=2)],
             {"eos_token_id": [], "stop": [stop]}),
            # Another family through the same seam: LLaMA with grouped-query attention.
            ([P(30, 30, 30, 30, num_gpu_batches=2), P(0, 0, 0, 100, num_gpu_batches=2)], {"eos_token_id": []},
             llama),
        ]
    else:
        cases = [
            tiers,
            ([P(30, 30, 30, 30, 30, 30, num_gpu_batches=2), P(0, 100, 0, 100, num_gpu_batches=2),
              P(num_gpu_batches=2)], {"eos_token_id": []}),
            ([P(gpu_batch_size=1, num_gpu_batches=4)], {"eos_token_id": [int(ref[0, P0])]}),
        ]
    expected = [_reference(path, pols[0], ids, mask, offload, kw, *other) for pols, kw, *other in cases]
    if world == 2:
        assert expected[3].shape[1] <= P0 + 2 and expected[4][1, -1] == 1   # the early stops happen
    codes, hung = _spawn(world, path, offload, cases, ids, mask, str(tmp_path))
    assert not hung and codes == [0] * world
    for r in range(world):
        got = torch.load(tmp_path / f"{r}.pt")
        for n, (g, e) in enumerate(zip(got, expected)):
            assert torch.equal(g, e), (r, n)
    assert not any(offload.glob("run-*"))   # every stage removed its run files


def test_killed_rank_ends_the_others(deep_opt, prompts, tmp_path):
    path, _ = deep_opt
    ids, mask = prompts
    offload = tmp_path / "offload"
    cases = [([P(0, 0, 0, 0, 0, 0)], {"eos_token_id": []})]
    t0 = time.monotonic()
    codes, hung = _spawn(2, path, offload, cases, ids, mask, str(tmp_path), die_after=1, timeout=60)
    assert not hung, "a stage waited past the timeout for its dead peer"
    assert codes[1] == -signal.SIGKILL and codes[0] == 3
    assert "pipeline stage 0 of 2: a peer stage failed" in (tmp_path / "error-0.txt").read_text()
    assert time.monotonic() - t0 < 60
    # The surviving stage removed its run files; the killed one's are left for the next
    # run's clean-up of dead processes' runs.
    from flexgen.offload import stale_runs
    assert sorted(offload.glob("run-*")) == stale_runs(offload)


def test_stalled_rank_times_out(deep_opt, prompts, tmp_path):
    """A rank that stops answering (SIGSTOP: its connections stay open) makes the
    others fail after the process group's timeout instead of waiting forever."""
    path, _ = deep_opt
    ids, mask = prompts
    cases = [([P()], {"eos_token_id": []})]
    codes, hung = _spawn(2, path, tmp_path / "offload", cases, ids, mask, str(tmp_path), die_after=1,
                         how=signal.SIGSTOP, timeout_s=3, timeout=60, wait_for=[0])
    assert hung and codes[0] == 3    # rank 1 stayed stopped (killed by the test); rank 0 gave up
    assert "peer stage failed or did not answer" in (tmp_path / "error-0.txt").read_text()


def test_torchrun_benchmark_cli(deep_opt, tmp_path):
    """`torchrun -m flexgen` runs the benchmark as 2 stages; rank 0 reports every stage."""
    import json
    import subprocess
    import sys
    path, _ = deep_opt
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "flexgen", "--model", str(path), "--percent", "0", "50", "50", "50", "100", "0",
           "--gpu-batch-size", "2", "--num-gpu-batches", "2", "--prompt-len", "8", "--gen-len", "4",
           "--device", "cpu", "--dtype", "float32", "--offload-dir", str(tmp_path / "off"), "--quiet",
           "--json-out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("pipeline of 2 stages") == 1
    r = json.loads(out.read_text())
    (a0, b0), (a1, b1) = [s["layers"] for s in r["stages"]]
    assert a0 == 0 and b0 == a1 and b1 == 8 and a1 > 1
    assert r["num_sequences"] == 4 and r["total_throughput_tok_s"] > 0
    assert not any((tmp_path / "off").glob("run-*"))


LLM_SCRIPT = '''
import json, sys, torch
from flexgen import LLM, Policy, SamplingParams
path, offload, out = sys.argv[1:4]
prompts = ["Paris is the capital", "the quick brown fox jumps over", "def generate model", "France", "lazy dog"]
params = [SamplingParams(max_new_tokens=6, logprobs=2, prompt_logprobs=True),
          SamplingParams(max_new_tokens=6, temperature=1.0, seed=7, stop=list("aeiou ")),
          SamplingParams(max_new_tokens=6, temperature=0.8, top_k=20, seed=8),
          SamplingParams(max_new_tokens=6, stop_token_ids=list(range(4, 200))),
          SamplingParams(max_new_tokens=3)]
policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=30, w_cpu_percent=30, cache_gpu_percent=50,
                cache_cpu_percent=25)
with LLM(path, policy, device="cpu", dtype=torch.float32, offload_dir=offload, progress=False) as llm:
    res = llm.generate(prompts, params, progress=False)
import torch.distributed as dist
if not dist.is_initialized() or dist.get_rank() == 0:
    json.dump([[o.text, o.token_ids, o.finish_reason,
                [(t.token_id, round(t.logprob, 4), [tid for tid, _ in t.top]) for t in o.logprobs or []],
                [None if t is None else round(t.logprob, 4) for t in o.prompt_logprobs or []]] for o in res],
              open(out, "w"))
'''


def test_llm_api_under_torchrun(opt_dir, tmp_path):
    """flexgen.LLM under torchrun: the same texts, tokens, finish reasons and log-probs
    as in one process (greedy, seeded sampling, stop strings and stop tokens)."""
    import json
    import subprocess
    import sys
    path, _ = opt_dir
    script = tmp_path / "llm_run.py"
    script.write_text(LLM_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "off"), str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), str(script), str(path), str(tmp_path / "off"),
                          str(tmp_path / "two.json")], capture_output=True, text=True, timeout=120, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert a == b
    assert {r[2] for r in a} >= {"length", "stop"}


def test_pipeline_cost_model():
    """One stage is the single-process estimate; stages with their weights resident scale
    with the number of stages (less than linearly: the prefill fills and drains the pipe,
    and in decode a stage runs its matmuls over one group of gpu batches, not the block:
    1.35x for two stages here); each stage holds its share of the weights."""
    from flexgen.models.registry import args_from_name
    from flexgen.optimizer.cost_model import estimate
    from flexgen.optimizer.hardware import load_hardware
    from flexgen.optimizer.pipeline import estimate_pipeline

    args, hw = args_from_name("opt-1.3b"), load_hardware("t4")
    pol = Policy(gpu_batch_size=8, num_gpu_batches=4)
    one = estimate_pipeline(args, [pol], 128, 16, hw, 1)
    assert one.throughput == pytest.approx(estimate(args, pol, 128, 16, hw).throughput, rel=1e-9)
    two = estimate_pipeline(args, [pol], 128, 16, hw, 2, link_latency=0)
    assert 1.3 < two.throughput / one.throughput <= 2.05 and two.bubble < 0.1
    assert two.stages[0].memory["gpu"] < 0.7 * one.stages[0].memory["gpu"]
    three = estimate_pipeline(args, [Policy(gpu_batch_size=8, num_gpu_batches=1)], 128, 16, hw, 3)
    assert three.groups == 1 and three.bubble > 0.6    # one group: the stages take turns


def test_pipeline_cost_model_shared_disk():
    """Weights on disk: each stage reads its layers once per group, so two stages read the
    model twice per token step. On two machines each has its own disk; on one machine the
    disk carries both stages' reads and bounds the step period."""
    from flexgen.models.registry import args_from_name
    from flexgen.optimizer.hardware import load_hardware
    from flexgen.optimizer.pipeline import estimate_pipeline

    args, hw = args_from_name("opt-1.3b"), load_hardware("t4")
    pol = Policy(gpu_batch_size=8, num_gpu_batches=4, w_gpu_percent=0, w_cpu_percent=0)
    one = estimate_pipeline(args, [pol], 128, 16, hw, 1, hosts=[0])
    apart = estimate_pipeline(args, [pol], 128, 16, hw, 2, link_latency=0, hosts=["a", "b"])
    assert apart.throughput == estimate_pipeline(args, [pol], 128, 16, hw, 2, link_latency=0).throughput
    shared = estimate_pipeline(args, [pol], 128, 16, hw, 2, link_latency=0, hosts=["a", "a"])
    steps = 16 - 1
    reads = sum(s.estimate.busy_time["decode"]["disk->cpu"] for s in shared.stages) / steps
    assert shared.decode_period == pytest.approx(shared.groups * reads, rel=1e-9)
    assert shared.decode_period > 1.3 * apart.decode_period
    assert shared.throughput < 0.75 * one.throughput < apart.throughput


def test_policy_cli_num_stages(capsys):
    import json
    from flexgen.cli import main
    assert main(["policy", "--model", "opt-1.3b", "--hardware", "t4", "--percent", "100", "0", "100", "0", "100",
                 "0", "--gpu-batch-size", "8", "--num-gpu-batches", "2", "--num-stages", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in out["pipeline"]["stages"]][0][0] == 0 and out["pipeline"]["throughput"] > 0
    # Weights on disk: two stages on one machine share its disk; on two they do not.
    tput = {}
    for nodes in ("1", "2"):
        assert main(["policy", "--model", "opt-1.3b", "--hardware", "t4", "--percent", "0", "0", "100", "0", "100",
                     "0", "--gpu-batch-size", "8", "--num-gpu-batches", "2", "--num-stages", "2", "--nodes", nodes,
                     "--json"]) == 0
        tput[nodes] = json.loads(capsys.readouterr().out)["pipeline"]["throughput"]
    assert tput["1"] < 0.8 * tput["2"]


def test_profile_network_under_torchrun(tmp_path):
    """`torchrun ... -m flexgen profile --network` stores the measured link in the profile."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import flexgen.optimizer
    src = Path(flexgen.optimizer.__file__).parent / "profiles" / "hardware_t4.json"
    out = tmp_path / "hw.json"
    shutil.copy(src, out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "flexgen", "profile", "--network", "--out", str(out), "--device", "cpu", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    hw = json.loads(out.read_text())
    assert hw["link_bw"] != 10e9 and hw["link_bw"] > 0 and hw["link_latency"] > 0
    assert hw["gpu_matmul_flops"] == json.loads(src.read_text())["gpu_matmul_flops"]   # the rest is kept
    from flexgen.cli import main
    assert main(["profile", "--network", "--out", str(out)]) == 2   # not under torchrun: a one-line error


def _t4_search(cpu0_gib):
    from flexgen.models.registry import args_from_name
    from flexgen.optimizer.hardware import load_hardware
    from flexgen.optimizer.pipeline import search_pipeline
    from flexgen.optimizer.solver import Budgets

    args, hw = args_from_name("opt-1.3b"), load_hardware("t4")
    G = 2**30
    budgets = [Budgets.from_request(hw, 2 * G, cpu0_gib * G, 100 * G), Budgets.from_request(hw, 2 * G, 8 * G, 100 * G)]
    return search_pipeline(args, 128, 16, hw, 2, budgets, cpu_cache_compute=False)


def test_stage_policies_fit_their_own_budgets():
    """Stage 0 with little host memory: the stages share the block but not the placement,
    each fits its own budgets, and the same inputs give the same plan."""
    plan = _t4_search(0.5)
    a, b = plan.policies
    assert (a.gpu_batch_size, a.num_gpu_batches) == (b.gpu_batch_size, b.num_gpu_batches)
    assert a.percent != b.percent
    assert a.w_gpu_percent + a.w_cpu_percent < 100 and b.w_gpu_percent + b.w_cpu_percent == 100   # 0 streams from disk
    for s, budgets in zip(plan.estimate.stages, plan.budgets):
        assert all(s.memory[t] <= budgets.of(t) + 1 for t in ("gpu", "cpu", "disk"))
        assert s.block_estimate.policy == s.policy
    assert plan.estimate.throughput > 0 and plan.lp_solves > 0
    again = _t4_search(0.5)
    assert again.policies == plan.policies and again.estimate.throughput == plan.estimate.throughput
    # Budgets for every stage alike: the slices still differ (the embedding is on stage 0 only).
    sym = _t4_search(8)
    assert sym.estimate.throughput > plan.estimate.throughput


def test_policy_cli_num_stages_search(capsys):
    import json
    from flexgen.cli import main
    assert main(["policy", "--model", "opt-1.3b", "--hardware", "t4", "--gpu-mem", "3", "--cpu-mem", "8",
                 "--prompt-len", "128", "--gen-len", "16", "--no-cpu-cache-compute", "--num-stages", "2"]) == 0
    out = capsys.readouterr().out
    assert "stage 0 policy: --percent" in out and "stage 1 policy: --percent" in out
    assert "predicted throughput" in out
    assert main(["policy", "--model", "opt-1.3b", "--hardware", "t4", "--gpu-mem", "3", "--cpu-mem", "8",
                 "--prompt-len", "128", "--gen-len", "16", "--no-cpu-cache-compute", "--num-stages", "2",
                 "--num-gpu-batches", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["policies"]) == 2 and {p["num_gpu_batches"] for p in out["policies"]} == {4}
    assert [s["layers"] for s in out["pipeline"]["stages"]][1][1] > 0 and out["pipeline"]["throughput"] > 0


AUTO_SCRIPT = '''
import json, os, sys, torch
from flexgen import LLM, Policy, SamplingParams
path, offload, hw, out = sys.argv[1:5]
rank = int(os.environ.get("RANK", "-1"))
# Per-rank budgets (bytes here, GiB below): little host memory on stage 0.
cpu = 0.3e6 if rank == 0 else 2e6
policy = "auto" if rank >= 0 else Policy(gpu_batch_size=2)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(4, 200, (n,), generator=g).tolist() for n in (9, 4, 7, 9, 2)]
with LLM(path, policy, gpu_mem=0.3e6 / 2**30, cpu_mem=cpu / 2**30, disk_mem=1.0, hardware=hw, device="cpu",
         dtype=torch.float32, offload_dir=offload, progress=False) as llm:
    res = llm.generate(prompts, SamplingParams(max_new_tokens=6, logprobs=1), progress=False)
    pol = llm.policy.to_dict()
json.dump({"tokens": [o.token_ids for o in res], "logprobs": [[round(t.logprob, 4) for t in o.logprobs] for o in res],
           "policy": pol}, open(f"{out}-{max(rank, 0)}.json", "w"))
'''


def test_auto_stage_policies_under_torchrun(deep_opt, tmp_path):
    """torchrun without a policy: the ranks plan together from their own budgets, each
    runs its stage's policy, and the greedy tokens are the single-process engine's."""
    import json
    import subprocess
    import sys

    from flexgen.optimizer.hardware import load_hardware
    path, _ = deep_opt
    hw = tmp_path / "hw.json"
    load_hardware("t4").replace(gpu_reserved=0, cpu_reserved=0).save(hw)
    script = tmp_path / "auto_run.py"
    script.write_text(AUTO_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(script), str(path), str(tmp_path / "off"), str(hw)]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=120, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), *args, str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=120, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "pipeline plan" in two.stderr and "stage 1 policy" in two.stderr
    ref = json.loads((tmp_path / "one-0.json").read_text())
    r0, r1 = (json.loads((tmp_path / f"two-{r}.json").read_text()) for r in (0, 1))
    assert r0["tokens"] == r1["tokens"] == ref["tokens"] and r0["logprobs"] == ref["logprobs"]
    p0, p1 = r0["policy"], r1["policy"]
    assert (p0["gpu_batch_size"], p0["num_gpu_batches"]) == (p1["gpu_batch_size"], p1["num_gpu_batches"])
    assert p0 != p1
