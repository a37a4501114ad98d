"""score() gathers the log-probabilities it needs per step: memory stays bounded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

import flexgen
from flexgen import Policy

SCRIPT = textwrap.dedent("""
    import sys, torch, flexgen
    torch.set_num_threads(1)   # the figure is memory; one thread keeps it quick on a busy machine
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    path, offload = sys.argv[1], sys.argv[2]
    policy = flexgen.Policy(gpu_batch_size=64, num_gpu_batches=4)
    with flexgen.load_model(path, policy, device="cpu", dtype=torch.float32, offload_dir=offload) as m:
        ids = torch.randint(4, 50000, (256, 72), generator=torch.Generator().manual_seed(0))
        m.score(ids[:, :9], prompt_len=8)          # warm-up: allocator pools, kernels
        base = hwm()
        out = m.score(ids, prompt_len=8)
        assert out.shape == (256, 64) and torch.isfinite(out).all()
        print(hwm() - base)
""")


def test_score_256_rows_64_tokens_memory(tmp_path):
    """A 13 MB model with OPT's 50272-token vocabulary: whole-vocabulary fp32 logits of 256
    rows x 64 scored tokens would be 3.3 GB (6.6 GB with their log-softmax)."""
    from conftest import make_checkpoint
    make_checkpoint(tmp_path / "ckpt", vocab_size=50272, tokenizer=False, layers=1)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "off")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    grew = int(r.stdout.strip().splitlines()[-1])
    assert grew < 1 << 30, f"score() peak grew by {grew / 2**30:.2f} GiB"


def test_score_equals_transformers_large_vocab(tmp_path):
    from conftest import make_checkpoint
    model = make_checkpoint(tmp_path / "ckpt", vocab_size=50272, tokenizer=False, layers=1, seed=5)
    ids = torch.randint(4, 50000, (6, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits.float(), dim=-1)[:, 4:-1].gather(2, ids[:, 5:, None]).squeeze(2)
    with flexgen.load_model(str(tmp_path / "ckpt"), Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=50,
                                                           w_cpu_percent=50), device="cpu", dtype=torch.float32,
                            offload_dir=tmp_path / "off") as m:
        got = m.score(ids, prompt_len=5)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
