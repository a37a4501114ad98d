"""The FlexGen paper's single-T4 results and the policies behind them.

Source: the FlexGen paper (Sheng et al., ICML 2023, arXiv 2303.06865), Table 2 and its
benchmark scripts. Prompt 512, generate 32, on GCP: T4 16 GB, 208 GB DRAM, 1.5 TB SSD.

Reference data, not part of the package: bench_optimizer_t4.py compares the optimizer
with it, and tests/test_optimizer.py checks policies/paper_*.json against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexgen.models.opt import ModelArgs
from flexgen.optimizer.cost_model import original_weight_split
from flexgen.policy import Policy

PAPER_BUDGETS_GIB = {"gpu": 16, "cpu": 208, "disk": 1500}
PROMPT_LEN, GEN_LEN = 512, 32


@dataclass(frozen=True)
class PaperRow:
    key: str                  # file stem under policies/
    model: str
    gpu_batch_size: int
    num_gpu_batches: int
    percent: tuple[float, ...]  # as published: wg wc cg cc hg hc
    flags: tuple[str, ...]      # Policy flags switched on (pin_weight is listed when off)
    throughput: float           # token/s measured in the paper

    @property
    def compressed(self) -> bool:
        return "compress_weight" in self.flags or "compress_cache" in self.flags

    def policy(self) -> Policy:
        """The policy as this engine should run it.

        The original placed whole tensors by their midpoint, so its weight split differs
        from the published percent where a layer's tensors straddle the boundary (OPT-30B
        "20 80": only out_proj of each attention layer was on the GPU, 8.2 % of the bytes).
        This engine honours percents exactly, so the achieved split is used, rounded to a
        whole percent.
        """
        wg, wc = original_weight_split(ModelArgs.from_name(self.model), self.percent[0], self.percent[1])
        wg, wc = round(wg), round(wc)
        flags = {f: True for f in self.flags if f != "no_pin_weight"}
        return Policy.from_percent((wg, wc) + tuple(self.percent[2:]), gpu_batch_size=self.gpu_batch_size,
                                   num_gpu_batches=self.num_gpu_batches,
                                   pin_weight="no_pin_weight" not in self.flags, **flags)

    def search_kwargs(self) -> dict:
        """What the optimizer may choose for the same setting."""
        return dict(allow_compress_weight="compress_weight" in self.flags,
                    allow_compress_cache="compress_cache" in self.flags)


PAPER_T4_ROWS = (
    PaperRow("paper_opt-6.7b", "opt-6.7b", 2, 1, (100, 0, 100, 0, 100, 0), (), 25.26),
    PaperRow("paper_opt-6.7b_4bit", "opt-6.7b", 72, 1, (100, 0, 100, 0, 100, 0),
             ("compress_weight", "compress_cache"), 29.12),
    PaperRow("paper_opt-30b", "opt-30b", 48, 3, (20, 80, 0, 100, 0, 100), ("cpu_cache_compute",), 7.32),
    PaperRow("paper_opt-30b_4bit", "opt-30b", 64, 8, (0, 100, 0, 100, 0, 100), ("compress_cache",), 8.38),
    PaperRow("paper_opt-175b", "opt-175b", 32, 8, (0, 50, 0, 0, 0, 100),
             ("cpu_cache_compute", "no_pin_weight"), 0.69),
    PaperRow("paper_opt-175b_4bit", "opt-175b", 48, 3, (0, 100, 0, 100, 0, 100),
             ("compress_weight", "compress_cache", "no_pin_weight"), 1.12),
)


def reference_file(row: PaperRow) -> dict:
    """The JSON object of policies/<row.key>.json (readable by Policy.load)."""
    p = row.policy()
    note = ("Policy of the FlexGen paper's single-T4 run. 'policy' is what this engine should run; "
            "'paper' is as published.")
    if tuple(p.percent) != tuple(float(x) for x in row.percent):
        note += (" The weight split differs: the original placed whole tensors by their midpoint, so the "
                 f"published {row.percent[0]:g}/{row.percent[1]:g} put {p.w_gpu_percent:g}% of the weight "
                 "bytes on the GPU; this engine honours percents exactly.")
    return {
        "policy": p.to_dict(),
        "model": row.model,
        "prompt_len": PROMPT_LEN,
        "gen_len": GEN_LEN,
        "hardware": "t4",
        "paper": {
            "throughput": row.throughput,
            "percent": list(row.percent),
            "gpu_batch_size": row.gpu_batch_size,
            "num_gpu_batches": row.num_gpu_batches,
            "flags": list(row.flags),
            "source": "FlexGen (arXiv 2303.06865), Table 2; T4 16 GB, 208 GB DRAM, 1.5 TB SSD",
        },
        "note": note,
    }
