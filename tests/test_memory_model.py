"""The cost model's working memory against what the engine allocates, and the FlexGen
paper's single-T4 policies against the T4 profile (issue 14, item 6)."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import flexgen
from flexgen.models.opt import ModelArgs
from flexgen.models.registry import args_from_config_file
from flexgen.optimizer import GIB, estimate, load_hardware
from flexgen.optimizer.budgets import Budgets
from flexgen.optimizer.cost_model import DEFAULT_ENGINE, original_weight_split
from flexgen.policy import Policy
from flexgen.memory import Tier
from test_optimizer import toy_hw

MIB = 2**20
# Factory ops that allocate the engine's own buffers; the tracker counts them right after.
_FACTORIES = ("aten.empty", "aten.zeros", "aten.ones", "aten.full", "aten.new_empty")


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created by torch ops (on this thread) and still alive,
    less what the engine's MemoryTracker counts on the compute tier: the peak is what
    the layers and the scheduler hold beyond the tracked buffers."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker, self.base = tracker, tracker.current[Tier.GPU]
        self.live: dict[int, int] = {}
        self.cur = self.peak = 0

    def _free(self, key):
        self.cur -= self.live.pop(key, 0)

    def sample(self):
        self.peak = max(self.peak, self.cur - (self.tracker.current[Tier.GPU] - self.base))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ins = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.live and key not in ins:
                    self.live[key] = st.nbytes()
                    self.cur += st.nbytes()
                    weakref.finalize(st, self._free, key)
        if not str(func).startswith(_FACTORIES):   # sampled once the result exists
            self.sample()
        return out


def measure(m, block: int, prompt_len: int, gen_len: int) -> dict[str, int]:
    """Peak untracked bytes on the compute device in prefill and in decode."""
    mode = LiveBytes(m.tracker)
    peaks, orig = {}, m.scheduler.hook

    def hook(name, seconds):
        if name == "prefill":
            peaks["prefill"], mode.peak = mode.peak, 0
        orig(name, seconds)

    m.scheduler.hook = hook
    try:
        with mode:
            m.generate(torch.randint(10, 2000, (block, prompt_len)), max_new_tokens=gen_len, eos_token_id=[])
    finally:
        m.scheduler.hook = orig
    peaks["decode"] = mode.peak
    return peaks


# The gpu-tier components the tracker does not count, with everything on the compute device.
UNTRACKED = ("hidden", "hidden buffers", "compute")


# Real widths (OPT-30B; Llama-3-8B with its 4:1 grouped-query attention), two layers and a
# small vocabulary so that the weights fit in 2.5 GiB of bf16.
CONFIGS = {
    "opt-30b-2l": dict(model_type="opt", hidden_size=7168, num_hidden_layers=2, num_attention_heads=56,
                       ffn_dim=28672, vocab_size=4096, max_position_embeddings=512),
    "llama-3-8b-2l": dict(model_type="llama", hidden_size=4096, num_hidden_layers=2, num_attention_heads=32,
                          num_key_value_heads=8, intermediate_size=14336, vocab_size=4096,
                          max_position_embeddings=512, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_working_memory_matches_the_engine(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIGS[name]))
    args = args_from_config_file(d / "config.json", name)
    hw = toy_hw(compute_device="cpu", compute_dtype="bfloat16", unified_memory=True)
    policy = Policy.from_percent((100, 0, 100, 0, 100, 0), gpu_batch_size=4, num_gpu_batches=2)
    gen = 3
    with flexgen.load_model(str(d), policy, device="cpu", dtype=torch.bfloat16, dummy=True,
                            offload_dir=tmp_path / "off") as m:
        for s in (16, 64):
            got = measure(m, policy.block_size, s, gen)
            est = estimate(args, policy, s, gen, hw)
            for phase in ("prefill", "decode"):
                gpu = est.memory_breakdown[phase]["gpu"]
                want = sum(gpu.get(k, 0) for k in UNTRACKED)
                with_headroom = want + gpu["compute headroom"]
                print(f"{name} s={s} {phase}: engine {got[phase] / MIB:.2f} MiB, "
                      f"model {want / MIB:.2f} MiB (+ headroom {with_headroom / MIB:.2f})")
                assert abs(got[phase] - want) <= 0.1 * got[phase] + 0.25 * MIB, (s, phase, got[phase], want)
                assert got[phase] <= with_headroom + 0.25 * MIB, (s, phase, got[phase], with_headroom)


# FlexGen's single-T4 runs (its benchmark/flexgen/bench_suite.py, suite all_1x1; the paper's
# Table 2 rows are the prompt-512 ones): model, prompt, percent, gbs, ngb, flags. Gen 32.
PAPER_T4_SUITE = [
    ("opt-6.7b", 256, (100, 0, 100, 0, 100, 0), 4, 1, dict(overlap=False)),
    ("opt-6.7b", 512, (100, 0, 100, 0, 100, 0), 2, 1, dict(overlap=False)),
    ("opt-6.7b", 1024, (100, 0, 100, 0, 100, 0), 1, 1, dict(overlap=False)),
    ("opt-6.7b", 256, (100, 0, 100, 0, 100, 0), 128, 1, dict(overlap=False, compress_weight=True, compress_cache=True)),
    ("opt-6.7b", 512, (100, 0, 100, 0, 100, 0), 72, 1, dict(overlap=False, compress_weight=True, compress_cache=True)),
    ("opt-6.7b", 1024, (100, 0, 100, 0, 100, 0), 28, 1, dict(overlap=False, compress_weight=True, compress_cache=True)),
    ("opt-30b", 256, (10, 90, 0, 100, 0, 100), 160, 2, dict(cpu_cache_compute=True)),
    ("opt-30b", 512, (20, 80, 0, 100, 0, 100), 48, 3, dict(cpu_cache_compute=True)),
    ("opt-30b", 1024, (4, 96, 0, 100, 0, 100), 20, 4, dict(cpu_cache_compute=True)),
    ("opt-30b", 256, (0, 100, 0, 100, 0, 100), 128, 8, dict(compress_cache=True)),
    ("opt-30b", 512, (0, 100, 0, 100, 0, 100), 64, 8, dict(compress_cache=True)),
    ("opt-30b", 1024, (0, 100, 0, 100, 0, 100), 20, 12, dict(compress_cache=True)),
    ("opt-175b", 256, (0, 50, 0, 0, 0, 100), 64, 8, dict(cpu_cache_compute=True, pin_weight=False)),
    ("opt-175b", 512, (0, 50, 0, 0, 0, 100), 32, 8, dict(cpu_cache_compute=True, pin_weight=False)),
    ("opt-175b", 1024, (0, 50, 0, 0, 0, 100), 12, 12, dict(cpu_cache_compute=True, pin_weight=False)),
    ("opt-175b", 256, (0, 100, 0, 100, 0, 100), 96, 3, dict(pin_weight=False, compress_weight=True, compress_cache=True)),
    ("opt-175b", 512, (0, 100, 0, 100, 0, 100), 48, 3, dict(pin_weight=False, compress_weight=True, compress_cache=True)),
    ("opt-175b", 1024, (0, 100, 0, 100, 0, 100), 12, 4, dict(pin_weight=False, compress_weight=True, compress_cache=True)),
]
T4 = load_hardware("t4")
T4_BUDGETS = Budgets.from_request(T4, 16 * GIB, 208 * GIB, 1500 * GIB)


def _paper_estimate(model, s, pct, gbs, ngb, flags):
    args = ModelArgs.from_name(model)
    wg, wc = original_weight_split(args, pct[0], pct[1])   # the original placed whole tensors
    policy = Policy.from_percent((round(wg), round(wc)) + pct[2:], gpu_batch_size=gbs, num_gpu_batches=ngb, **flags)
    return estimate(args, policy, s, 32, T4, budgets=T4_BUDGETS)


@pytest.mark.parametrize("case", PAPER_T4_SUITE, ids=lambda c: f"{c[0]}-s{c[1]}-{c[3]}x{c[4]}")
def test_paper_t4_policies_are_feasible_on_the_t4_profile(case):
    est = _paper_estimate(*case)
    assert est.feasible, est.shortfalls


def test_large_batch_prefill_working_memory():
    """OPT-30B, 160 sequences x 256 tokens: attention's six (b, s, h) temporaries and its
    output (3.83 GiB) and the masks; not the 4.9 GiB of an MLP with two ffn-wide tensors
    plus a separate 0.55 GiB layer output, as the model had it before."""
    est = _paper_estimate(*PAPER_T4_SUITE[6])
    gpu = est.memory_breakdown["prefill"]["gpu"]
    b, s, h = 160, 256, 7168
    assert gpu["compute"] == pytest.approx(7 * b * s * h * 2 + b * s * s * (DEFAULT_ENGINE.mask_bytes + 2))
    assert gpu["compute"] < 4 * GIB and "layer output" not in gpu
    assert gpu["compute headroom"] == pytest.approx(DEFAULT_ENGINE.working_headroom * gpu["compute"])
