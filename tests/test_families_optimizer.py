"""The optimizer on LLaMA-layout families: GQA cache sizes, feasible policies for 70B-class
models, and predicted memory per tier against the engine's tracker on this CPU."""

from __future__ import annotations

import json

import pytest
import torch

import flexgen
from flexgen.models.registry import args_from_config_file, args_from_name
from flexgen.optimizer import GIB, estimate, load_hardware, search
from flexgen.optimizer.cost_model import BlockModel
from flexgen.policy import Policy
from test_optimizer import toy_hw


def test_gqa_cache_bytes_and_flops():
    """llama-3-70b keeps 8 of 64 heads' K/V: its cache per token is 1/8 of a hidden_size-wide one."""
    hw = load_hardware("t4")
    args = args_from_name("llama-3-70b")
    m = BlockModel(args, 512, 32, 4, 1, hw)
    assert m.cache_bytes_per_token() == 2 * 8 * 128 * 2                 # K + V, 8 heads x 128, fp16
    assert BlockModel(args, 512, 32, 4, 1, hw, compress_cache=True).cache_bytes_per_token() < 2 * 1024 * 2 / 3
    mha = args_from_name("llama-2-13b")
    assert BlockModel(mha, 512, 32, 4, 1, hw).cache_bytes_per_token() == 2 * 5120 * 2
    # A whole 70B block's cache (80 layers, 512 + 32 tokens, 32 rows): 10.6 GiB, not 85.
    est = estimate(args, Policy.from_percent((0, 100, 0, 100, 0, 100), gpu_batch_size=32), 512, 32, hw)
    cpu = est.memory_breakdown["decode"]["cpu"]
    assert est.memory["cpu"] - cpu["weights"] - cpu.get("pinned headroom", 0) < 12 * GIB


@pytest.mark.parametrize("model", ["llama-3-70b", "qwen2.5-72b"])
@pytest.mark.parametrize("hw_name", ["t4", "cpu"])
def test_search_finds_feasible_policies(model, hw_name):
    hw = load_hardware("t4") if hw_name == "t4" else toy_hw(
        compute_device="cpu", compute_dtype="bfloat16", unified_memory=True, gpu_mem=16 * GIB, cpu_mem=64 * GIB)
    policy, est = search(args_from_name(model), 512, 32, hw, gpu_mem=16 * GIB if hw_name == "t4" else 8 * GIB,
                         cpu_mem=200 * GIB if hw_name == "t4" else 48 * GIB, disk_mem=1500 * GIB,
                         allow_compress_weight=True, allow_compress_cache=True)
    assert est.feasible and est.throughput > 0
    assert est.memory["gpu"] <= 16 * GIB


def test_policy_cli_on_llama_3_70b(capsys):
    from flexgen.optimizer.cli import policy_main
    assert policy_main(["--model", "llama-3-70b", "--hardware", "t4", "--gpu-mem", "24", "--cpu-mem", "200",
                        "--disk-mem", "1500", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimate"]["feasible"] and out["estimate"]["model"] == "llama-3-70b"


# Components of the cost model that the engine's MemoryTracker counts (as in
# benchmarks/validate_optimizer_cpu.py).
TRACKED = {"gpu": ("weights", "weight slots", "kv cache", "dequantized weights"),
           "cpu": ("weights", "weight staging", "kv cache", "hidden", "hidden staging"),
           "disk": ("weights", "kv cache", "hidden")}
TRACKED_DECODE = {"gpu": ("cache buffers", "attention tiles"), "cpu": ("cache buffers", "attention tiles"),
                  "disk": ()}


def _tracked(est, tier):
    return max(sum(v for k, v in tiers[tier].items()
                   if k in TRACKED[tier] + (TRACKED_DECODE[tier] if phase == "decode" else ()))
               for phase, tiers in est.memory_breakdown.items())


def _check_tracked(tmp_path, config: dict, pct, flags, s: int, n: int, tol: int = 2**20, under: int = 0) -> None:
    """Each tier's tracked peak of a run of `config` (dummy weights, fp32 on the CPU) within
    `tol` bytes of the cost model's tracked components, or up to `under` bytes more below."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    hw = toy_hw(compute_device="cpu", compute_dtype="float32", unified_memory=True)
    policy = Policy.from_percent(pct, gpu_batch_size=4, num_gpu_batches=2, **flags)
    est = estimate(args_from_config_file(d / "config.json", "model"), policy, s, n, hw)
    with flexgen.load_model(str(d), policy, device="cpu", dtype=torch.float32, dummy=True,
                            offload_dir=tmp_path / "off") as m:
        ids = torch.randint(10, 2000, (policy.block_size, s))
        m.generate(ids, max_new_tokens=n, eos_token_id=[])
        got = m.stats.peak_memory
    for tier in ("gpu", "cpu", "disk"):
        want = _tracked(est, tier)
        assert want - under - tol < got.get(tier, 0) < want + tol, (tier, got.get(tier, 0), want)


@pytest.mark.parametrize("pct,flags", [
    ((100, 0, 100, 0, 100, 0), {}),
    ((30, 30, 30, 30, 30, 30), {}),
    ((0, 0, 0, 0, 0, 0), {}),
    ((0, 100, 25, 75, 100, 0), dict(cpu_cache_compute=True)),
    ((50, 50, 50, 0, 100, 0), dict(compress_weight=True, compress_cache=True)),
], ids=["gpu", "mixed", "disk", "ccc", "4bit"])
def test_predicted_memory_matches_the_engine(tmp_path, pct, flags):
    """A 2-layer GQA model (16 heads, 2 K/V heads, as 70B's 8:1) with dummy weights. A cache
    priced at hidden_size per token would be off by 7.8 MiB here; the match is within 0.3."""
    _check_tracked(tmp_path, dict(
        model_type="llama", hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=2,
        intermediate_size=2816, vocab_size=2048, max_position_embeddings=256, tie_word_embeddings=False),
        pct, flags, s=64, n=4)


@pytest.mark.parametrize("flags", [dict(compress_cache=True), dict(compress_cache=True, cpu_cache_compute=True)],
                         ids=["device", "host-attention"])
def test_predicted_packed_cache_buffers_match_the_engine(tmp_path, flags):
    """A compressed cache part on disk is read, still packed, into a host buffer of its
    stored bytes (kvcache.HostBuffers), and rows attend over it a tile at a time from one
    fp32 workspace per tier (kvcache.PackedAttention: 6.1 MiB here), which the model must
    count; no working K/V copies are made. How many (layer, batch) packed sets are in
    flight at once depends on when the store worker finishes: the model counts the most
    measured (4); runs have held 2 to 4 (a set is 0.43 MiB here: 2 disk rows x (K+V)
    196 positions x 1152 bytes)."""
    _check_tracked(tmp_path, dict(
        model_type="opt", hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, ffn_dim=4096,
        vocab_size=2048, max_position_embeddings=256, word_embed_proj_dim=1024),
        (0, 100, 0, 50, 100, 0), flags, s=192, n=4, under=2 * 2 * 196 * 1152)
