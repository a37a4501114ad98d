"""Checkpoint sources and the weight store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch

import flexgen
from flexgen import Policy


def test_hf_cache_by_id(opt_dir, prompts, tmp_path, monkeypatch):
    """An id present in the local Hugging Face cache loads offline, like its directory."""
    path, _ = opt_dir
    hub = tmp_path / "hub"
    snap = hub / "models--facebook--opt-tiny-test" / "snapshots" / ("0" * 40)
    shutil.copytree(path, snap)
    (hub / "models--facebook--opt-tiny-test" / "refs").mkdir()
    (hub / "models--facebook--opt-tiny-test" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    ids, mask = prompts
    outs = []
    for model in ("facebook/opt-tiny-test", str(path)):
        with flexgen.load_model(model, Policy(gpu_batch_size=2), device="cpu", dtype=torch.float32,
                                offload_dir=tmp_path / "off") as m:
            outs.append(m.generate(ids, mask, max_new_tokens=3, eos_token_id=[]))
    assert torch.equal(outs[0], outs[1])


# Anonymous RSS, sampled: the checkpoint's mmapped pages are reclaimable and not counted.
CONVERT = """
import sys, threading, time, torch
from flexgen.checkpoint import CheckpointSource
from flexgen.weightstore import WeightStore

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

src = CheckpointSource(sys.argv[1])
base, peak, done = anon(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
WeightStore.open_or_build(src, torch.bfloat16, False, sys.argv[2], progress=False)
done.append(1); t.join()
print(peak[0] - base)
"""


def test_conversion_peak_memory_near_one_tensor(tmp_path):
    from conftest import make_checkpoint
    d = tmp_path / "ckpt"
    make_checkpoint(d, tokenizer=False, hidden_size=512, ffn_dim=2048, num_attention_heads=8, layers=10)
    ckpt_bytes = (d / "model.safetensors").stat().st_size
    assert ckpt_bytes > 100e6
    res = subprocess.run([sys.executable, "-c", CONVERT, str(d), str(tmp_path / "off")],
                         capture_output=True, text=True, check=True)
    growth = int(res.stdout.strip())
    largest = 2048 * 512 * 4
    # The model never sits in RAM: growth stays within a few tensors, far below the checkpoint.
    assert growth < max(8 * largest, 0.25 * ckpt_bytes), (growth, ckpt_bytes)
    manifest = json.loads(next((tmp_path / "off" / "weights").glob("*/manifest.json")).read_text())
    assert len(manifest["layers"]) == 2 * 10 + 2
