"""flexgen against transformers' OPTForCausalLM, fp32, across a matrix of policies."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flexgen
from flexgen import Policy
from flexgen.errors import FlexGenError

GEN = 6


def hf_reference(model, ids, mask, gen=GEN):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=gen, do_sample=False, eos_token_id=None,
                         pad_token_id=1, output_scores=True, return_dict_in_generate=True,
                         output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1).float()


def run(path, policy, ids, mask, offload, gen=GEN, **kw):
    with flexgen.load_model(str(path), policy, device="cpu", dtype=torch.float32, offload_dir=offload) as m:
        return m.generate(ids, mask, max_new_tokens=gen, eos_token_id=[], output_logits=True, **kw)


def P(wg=100, wc=0, cg=100, cc=0, hg=100, hc=0, **kw):
    kw.setdefault("gpu_batch_size", 2)
    return Policy(w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc,
                  act_gpu_percent=hg, act_cpu_percent=hc, **kw)


POLICIES = {
    "all-gpu": P(),
    "weights-cpu": P(0, 100),
    "weights-disk": P(0, 0),
    "cache-cpu": P(cg=0, cc=100),
    "cache-disk": P(cg=0, cc=0),
    "act-disk": P(hg=0, hc=0),
    "mixed-30-30-40": P(30, 30, 30, 30, 30, 30, gpu_batch_size=3),
    "ngb2": P(30, 30, 30, 30, 30, 30, num_gpu_batches=2),
    "ngb4": P(0, 50, 0, 50, 50, 0, gpu_batch_size=1, num_gpu_batches=4),
    "no-overlap-disk": P(0, 0, 0, 0, 0, 0, overlap=False, num_gpu_batches=2),
    "cpu-cache-compute": P(50, 50, 25, 50, 100, 0, gpu_batch_size=4, cpu_cache_compute=True, num_gpu_batches=2),
    "cpu-cache-compute-disk": P(0, 0, 0, 50, gpu_batch_size=2, cpu_cache_compute=True, num_gpu_batches=2),
    "all-disk-ngb4-seq": P(0, 0, 0, 0, 0, 0, gpu_batch_size=1, num_gpu_batches=4, overlap=False),
}


POST_LN_POLICIES = ["all-gpu", "mixed-30-30-40", "cpu-cache-compute", "all-disk-ngb4-seq"]
CASES = [("opt_dir", n) for n in POLICIES] + [("opt350_dir", n) for n in POST_LN_POLICIES]


@pytest.mark.parametrize("checkpoint,name", CASES, ids=[f"{c.removesuffix('_dir')}-{n}" for c, n in CASES])
def test_matches_transformers(request, prompts, offload, checkpoint, name):
    """opt_dir: pre-LN; opt350_dir: the opt-350m shape (post-LN, project_in/out)."""
    path, model = request.getfixturevalue(checkpoint)
    ids, mask = prompts
    ref_seq, ref_logits = hf_reference(model, ids, mask)
    seq, logits = run(path, POLICIES[name], ids, mask, offload)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_sharded_safetensors_and_bin(tmp_path, prompts, offload):
    from conftest import make_checkpoint
    ids, mask = prompts
    for safe in (True, False):
        d = tmp_path / f"ckpt-{safe}"
        model = make_checkpoint(d, safe=safe, shard="60KB", tokenizer=False, seed=3)
        assert len(list(d.glob("*.safetensors" if safe else "*.bin"))) > 1
        ref_seq, _ = hf_reference(model, ids, mask)
        seq, _ = run(d, P(50, 25, 50, 25), ids, mask, offload)
        assert torch.equal(seq, ref_seq)


def test_eos_stops_rows_and_pads(opt_dir, prompts, offload):
    path, model = opt_dir
    ids, mask = prompts
    # Use the token the reference emits first in row 0 as "EOS": that row ends at once.
    ref_full, _ = hf_reference(model, ids, mask, gen=8)
    eos = int(ref_full[0, ids.shape[1]])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                         pad_token_id=1)
    with flexgen.load_model(str(path), P(), device="cpu", dtype=torch.float32, offload_dir=offload) as m:
        out = m.generate(ids, mask, max_new_tokens=8, eos_token_id=eos)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("policy", [P(cg=0, cc=0), P(cg=50, cc=0, num_gpu_batches=2, gpu_batch_size=1)],
                         ids=["cache-disk-ngb1", "cache-mixed-ngb2"])
def test_early_stop_releases_prefetched_cache(opt_dir, prompts, offload, policy):
    """Every row stops at its first token: cache loads the scheduler prefetched for the
    next token are never used, and their working buffers must not stay counted."""
    path, model = opt_dir
    ids, mask = prompts
    ref_full, _ = hf_reference(model, ids, mask, gen=2)
    eos = sorted({int(t) for t in ref_full[:, ids.shape[1]]})
    with flexgen.load_model(str(path), policy, device="cpu", dtype=torch.float32, offload_dir=offload) as m:
        held = dict(m.tracker.current)
        for _ in range(2):
            out = m.generate(ids, mask, max_new_tokens=8, eos_token_id=eos)
            assert out.shape[1] == ids.shape[1] + 1
            assert m.tracker.current == held


def test_sampling_reproducible_with_seed(opt_dir, prompts, offload):
    path, _ = opt_dir
    ids, mask = prompts
    outs = []
    for policy in (P(), P(0, 0, 0, 50, gpu_batch_size=2)):
        with flexgen.load_model(str(path), policy, device="cpu", dtype=torch.float32, offload_dir=offload) as m:
            for _ in range(2):
                g = torch.Generator().manual_seed(123)
                outs.append(m.generate(ids, mask, max_new_tokens=GEN, do_sample=True, temperature=0.8,
                                       top_p=0.9, top_k=50, eos_token_id=[], generator=g))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    greedy = run(path, P(), ids, mask, offload)[0]
    assert not torch.equal(outs[0], greedy)  # sampling really samples


def test_greedy_is_argmax_including_ties_and_nan():
    from flexgen.sampling import greedy
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randint(0, 3, (33, 5000), generator=gen).to(dtype)   # many equal maxima per row
        x[4, 17] = float("nan")
        x[9] = 1.0                                                       # a row of one value
        assert torch.equal(greedy(x), x.argmax(dim=-1))
        y = torch.randn(8, 50272, generator=gen).to(dtype)
        assert torch.equal(greedy(y), y.argmax(dim=-1))


def test_stop_sequence(opt_dir, prompts, offload):
    path, model = opt_dir
    ids, mask = prompts
    ref, _ = hf_reference(model, ids, mask, gen=8)
    P0 = ids.shape[1]
    stop = ref[1, P0 + 1:P0 + 3].tolist()   # row 1's 2nd and 3rd new tokens
    with flexgen.load_model(str(path), P(), device="cpu", dtype=torch.float32, offload_dir=offload) as m:
        out = m.generate(ids, mask, max_new_tokens=8, eos_token_id=[], stop=[stop])
    gen = ref[1, P0:].tolist()
    end = next(n for n in range(len(stop), len(gen) + 1) if gen[n - len(stop):n] == stop)
    assert torch.equal(out[1, :P0 + end], ref[1, :P0 + end])   # identical up to the stop sequence
    assert out[1, P0 + end:].eq(1).all()                        # padding after it
    assert not out[0, P0:].eq(1).all()                          # other rows go on


def test_weight_split_tracks_request(opt_dir, offload):
    path, _ = opt_dir
    for wg, wc in [(25, 30), (30, 30), (33, 33), (10, 85)]:
        with flexgen.load_model(str(path), P(wg, wc), device="cpu", dtype=torch.float32,
                                offload_dir=offload) as m:
            got = m.placement.achieved()["weights"]
        assert abs(got[0] - wg) < 1.0 and abs(got[1] - wc) < 1.0, (wg, wc, got)


def test_decode_disk_reads_are_the_decode_steps_share(opt_dir, prompts, offload):
    """Weights on disk, nothing else, sequential: every token step reads them once, so
    the decode's share of the bytes read is (steps - 1) / steps."""
    path, _ = opt_dir
    ids, mask = prompts
    with flexgen.load_model(str(path), P(0, 0, 100, 0, 100, 0, overlap=False), device="cpu", dtype=torch.float32,
                            offload_dir=offload) as m:
        m.generate(ids, mask, max_new_tokens=GEN, eos_token_id=[])
        s = m.stats
    assert s.disk_read_bytes > 0
    assert s.decode_disk_read_bytes == pytest.approx(s.disk_read_bytes * (GEN - 1) / GEN, rel=1e-6)


def test_disk_tier_really_reads_and_writes(opt_dir, prompts, offload, monkeypatch):
    """Count bytes through DiskFile; corrupting the weights' disk part is then detected."""
    from flexgen import diskio
    path, _ = opt_dir
    ids, mask = prompts
    counts = {"read": 0, "write": 0}
    orig_read, orig_write = diskio.DiskFile.read, diskio.DiskFile.write

    def read(self, offset, dst, *args, **kwargs):
        counts["read"] += dst.numel() * dst.element_size()
        return orig_read(self, offset, dst, *args, **kwargs)

    def write(self, offset, src):
        counts["write"] += src.numel() * src.element_size()
        return orig_write(self, offset, src)

    monkeypatch.setattr(diskio.DiskFile, "read", read)
    monkeypatch.setattr(diskio.DiskFile, "write", write)
    seq, _ = run(path, P(0, 0, 0, 0, 0, 0), ids, mask, offload)
    assert counts["read"] > 0 and counts["write"] > 0
    monkeypatch.setattr(diskio.DiskFile, "read", orig_read)
    monkeypatch.setattr(diskio.DiskFile, "write", orig_write)
    # Zero the weight store files: a disk-only run reads them, and their checksums fail.
    for f in (offload / "weights").rglob("layer_*.bin"):
        f.write_bytes(bytes(f.stat().st_size))
    with pytest.raises(FlexGenError, match="corrupt"):
        run(path, P(0, 0, 0, 0, 0, 0), ids, mask, offload)


def test_weight_disk_reads_one_at_a_time_in_layer_order(opt_dir, prompts, offload, monkeypatch):
    """The next layer's load is issued while this one's may still be reading; its disk
    read waits, so weight reads never share the disk and start in layer order. Each read
    is slowed so that, without the wait, two would be in flight."""
    import threading
    import time

    from flexgen import diskio
    path, _ = opt_dir
    ids, mask = prompts
    state = {"in": 0, "most": 0, "order": []}
    lock = threading.Lock()
    orig_read = diskio.DiskFile.read

    def read(self, offset, dst, *args, **kwargs):
        weight = self.path.name.startswith("layer_") and dst.numel() > 0   # placement reads 0 bytes here
        if weight:
            with lock:
                state["in"] += 1
                state["most"] = max(state["most"], state["in"])
                state["order"].append(int(self.path.stem.split("_")[1]))
            time.sleep(0.02)
        try:
            return orig_read(self, offset, dst, *args, **kwargs)
        finally:
            if weight:
                with lock:
                    state["in"] -= 1

    monkeypatch.setattr(diskio.DiskFile, "read", read)
    policy = P(0, 0, 100, 0, 100, 0, num_gpu_batches=2)
    seq, logits = run(path, policy, ids, mask, offload)
    order, layers = state["order"], len(set(state["order"]))
    assert state["most"] == 1
    # Layer after layer; a block's last step also prefetches the next step's layer 0.
    assert all(b in ((a + 1) % layers, 0) for a, b in zip(order, order[1:])), [(n, a, b) for n, (a, b) in enumerate(zip(order, order[1:])) if b not in ((a + 1) % layers, 0)]
    assert order.count(layers - 1) == GEN * -(-ids.shape[0] // 4)
    monkeypatch.setattr(diskio.DiskFile, "read", orig_read)
    ref, ref_logits = run(path, P(), ids, mask, offload)
    assert torch.equal(seq, ref)
    torch.testing.assert_close(logits, ref_logits)


@pytest.mark.parametrize("compress", [False, True])
def test_cache_and_hidden_reads_go_ahead_of_weight_reads(opt_dir, prompts, offload, monkeypatch, compress):
    """Weights, KV cache and hidden states all on disk: every weight read yields to urgent
    reads and runs on the weight loaders; every cache and hidden read is urgent and runs
    on the other loaders, so it never queues behind a weight load waiting for the disk.
    Tokens and logits are those of the all-in-memory run."""
    import threading
    from contextlib import contextmanager

    from flexgen import diskio
    path, _ = opt_dir
    ids, mask = prompts
    seen = {"weights": [], "other": []}
    lock, local = threading.Lock(), threading.local()
    orig_read, orig_urgent = diskio.DiskFile.read, diskio.ReadPriority.urgent

    @contextmanager
    def urgent(self):
        with orig_urgent(self):
            local.urgent = getattr(local, "urgent", 0) + 1
            try:
                yield
            finally:
                local.urgent -= 1

    def read(self, offset, dst, *args, yield_to=None, **kwargs):
        if dst.numel():
            name, thread = self.path.name, threading.current_thread().name
            with lock:
                if name.startswith("layer_"):
                    seen["weights"].append((yield_to is not None, thread.startswith("flexgen-weights")))
                elif name.startswith(("kv_layer_", "hidden_")):
                    seen["other"].append((getattr(local, "urgent", 0) > 0, thread.startswith("flexgen-load")))
        return orig_read(self, offset, dst, *args, yield_to=yield_to, **kwargs)

    monkeypatch.setattr(diskio.DiskFile, "read", read)
    monkeypatch.setattr(diskio.ReadPriority, "urgent", urgent)
    seq, logits = run(path, P(0, 0, 0, 0, 0, 0, num_gpu_batches=2, compress_cache=compress), ids, mask, offload)
    assert seen["weights"] and all(a and b for a, b in seen["weights"]), seen["weights"]
    assert seen["other"] and all(a and b for a, b in seen["other"]), seen["other"]
    monkeypatch.undo()
    ref, ref_logits = run(path, P(compress_cache=compress), ids, mask, offload)
    assert torch.equal(seq, ref)
    torch.testing.assert_close(logits, ref_logits)


@pytest.mark.parametrize("policy", [P(num_gpu_batches=3), P(0, 50, 0, 50, 50, 25, num_gpu_batches=3),
                                    P(0, 0, 0, 0, 0, 0, num_gpu_batches=3, overlap=False),
                                    P(50, 50, 0, 50, 100, 0, num_gpu_batches=3, cpu_cache_compute=True,
                                      compress_cache=True)],
                         ids=["in-memory", "on-three-tiers", "disk-sequential", "host-attention-4bit"])
def test_decode_runs_a_decoder_layers_matmuls_once_for_the_block(opt_dir, prompts, offload, monkeypatch, policy):
    """Prefill runs each layer per gpu batch. Decode runs an MLP layer and an attention
    layer's projections once over every row of the block, and attention per gpu batch
    over its cache (scheduler.Scheduler._attention_merged); with hidden states and caches
    resident, split across tiers or read back from disk after their store, and host
    attention over a 4-bit cache. Tokens and logits: those of transformers (4-bit: of
    the same policy unmerged, one gpu batch at a time)."""
    from flexgen.models import opt

    path, model = opt_dir
    ids, mask = prompts
    rows = {"mlp": [], "attention_in": [], "attention_core": []}
    for name in rows:
        def recorder(*a, name=name, orig=getattr(opt, name)):
            x = a[0] if name == "attention_core" else a[1]
            rows[name].append(tuple(x.shape[:2]))
            return orig(*a)
        monkeypatch.setattr(opt, name, recorder)
    seq, logits = run(path, policy, ids, mask, offload)
    layers = model.config.num_hidden_layers
    gbs, ngb, P_, steps = policy.gpu_batch_size, policy.num_gpu_batches, ids.shape[1], GEN - 1
    merged = [(gbs, P_)] * (ngb * layers) + [(gbs * ngb, 1)] * (layers * steps)
    assert rows["mlp"] == merged and rows["attention_in"] == merged
    assert rows["attention_core"] == [(gbs, P_)] * (ngb * layers) + [(gbs, 1)] * (ngb * layers * steps)
    if policy.compress_cache:
        monkeypatch.undo()
        ref_seq, ref_logits = run(path, dataclasses.replace(policy, num_gpu_batches=1, gpu_batch_size=gbs * ngb),
                                  ids, mask, offload)
    else:
        ref_seq, ref_logits = hf_reference(model, ids, mask)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_run_files_removed_store_kept(opt_dir, prompts, offload):
    path, _ = opt_dir
    ids, mask = prompts
    run(path, P(0, 0, 0, 0, 0, 0), ids, mask, offload)
    assert not list(offload.glob("run-*")), "KV cache / activation files left behind"
    manifests = list((offload / "weights").glob("*/manifest.json"))
    assert len(manifests) == 1
    mtime = manifests[0].stat().st_mtime_ns
    run(path, P(0, 0, 0, 0, 0, 0), ids, mask, offload)
    assert manifests[0].stat().st_mtime_ns == mtime, "weight store rebuilt although unchanged"


def test_dummy_weights_deterministic_any_placement(offload):
    ids = torch.randint(4, 1000, (3, 8), generator=torch.Generator().manual_seed(0))
    outs = []
    for policy in (P(), P(0, 30, 0, 50, 0, 50)):
        with flexgen.load_model("opt-125m", policy, device="cpu", dtype=torch.float32, offload_dir=offload,
                                dummy=True) as m:
            outs.append(m.generate(ids, max_new_tokens=3, eos_token_id=[]))
    assert torch.equal(outs[0], outs[1])
    assert not list(offload.glob("run-*"))


def test_score_matches_transformers_logprobs(opt_dir, prompts, offload):
    path, model = opt_dir
    ids = prompts[0][[0, 4]]           # unpadded rows
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits.float(), dim=-1)
    ref = ref[:, 2:-1].gather(2, ids[:, 3:].unsqueeze(2)).squeeze(2)
    with flexgen.load_model(str(path), P(0, 50, 0, 50, gpu_batch_size=1, num_gpu_batches=2), device="cpu",
                            dtype=torch.float32, offload_dir=offload) as m:
        got = m.score(ids, prompt_len=3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)

