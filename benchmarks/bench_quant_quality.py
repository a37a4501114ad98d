"""4-bit quality on a model with real structure: held-out perplexity of a small byte-level OPT.

    python benchmarks/bench_quant_quality.py [--steps 900] [--train-seconds S]

(run from the repo root; `python -m benchmarks.bench_quant_quality` works too).

1. Trains a small byte-level OPT (tokens = bytes 0..255, plus BOS/EOS/PAD specials)
   from scratch with plain PyTorch on the Python standard library's own top-level
   source files (`Path(os.__file__).parent / "*.py"`, sorted; every 10th file is held
   out for evaluation), for a time budget (`--train-seconds`, learning-rate schedule by
   the clock) or an exact number of steps (`--steps`, schedule by step: repeatable on the
   same machine and Python). Under a time budget the number of steps, and so the model
   and its sensitivity to quantization, depend on machine speed and load: a
   better-trained model loses more to 4-bit weights.
2. Saves it as a Hugging Face checkpoint in a temporary directory.
3. Scores the same held-out sequences (BOS + 128 bytes each) through flexgen with
   prompt_len=1, so every byte is scored by a decode step through the engine's real KV
   cache, in four configurations: full precision, 4-bit weights, 4-bit KV cache, both.
   Perplexity = exp(-mean log-prob) per byte.
4. Sanity checks: flexgen's full-precision perplexity against plain transformers
   (`model(ids).logits`), and flexgen's 4-bit-weight perplexity against transformers
   running on weights quantize->dequantized with flexgen.quant (same groups); plus the
   4-bit weight loss broken down by tensor kind (simulated the same way).

Exits 1 if 4-bit weights + 4-bit cache raise perplexity by more than --target percent
(default 3 %; the FlexGen paper saw +1.4 % on OPT-30B WikiText), or if a sanity check fails.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # run as a script from the repo root without installing
    import flexgen
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import flexgen
from flexgen import Policy
from flexgen.quant import WEIGHT_QUANT, dequantize, quantize

BOS, EOS, PAD = 256, 257, 258
VOCAB = 260
# For the per-tensor breakdown of the 4-bit weight error (parameter-name substrings).
WEIGHT_GROUPS = [("token embedding (tied LM head)", "embed_tokens"), ("position embedding", "embed_positions"),
                 ("attention q/k/v/out", "self_attn."), ("FFN fc1/fc2", ".fc")]


# ---------------------------------------------------------------------------------------
# Data: the standard library's own source, on every machine with Python.

def stdlib_corpus(holdout_every: int = 10):
    root = Path(os.__file__).parent
    files = sorted(root.glob("*.py"))
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % holdout_every == holdout_every // 2 else train).append(f)

    def cat(fs):
        return torch.frombuffer(bytearray(b"\n".join(f.read_bytes() for f in fs)), dtype=torch.uint8).long()

    return root, train, held, cat(train), cat(held)


def eval_sequences(data: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """n evenly spaced, non-overlapping windows of seq_len bytes, each after a BOS."""
    if len(data) < n * seq_len:
        raise SystemExit(f"held-out data too small: {len(data)} bytes for {n} x {seq_len}")
    stride = (len(data) - seq_len) // max(n - 1, 1)
    rows = torch.stack([data[i * stride:i * stride + seq_len] for i in range(n)])
    return torch.cat([torch.full((n, 1), BOS), rows], dim=1)


# ---------------------------------------------------------------------------------------
# Training.

def build_model(args):
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, ffn_dim=args.ffn,
                    max_position_embeddings=args.seq_len * 2, word_embed_proj_dim=args.hidden,
                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                    do_layer_norm_before=True, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return OPTForCausalLM(cfg)


def lr_at(step: int, progress: float, warmup: int, peak: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from peak to 10 % over training progress 0..1."""
    warm = min(1.0, (step + 1) / warmup)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(model, data: torch.Tensor, args, log):
    """Train until --steps steps, or until --train-seconds have passed (progress by the clock)."""
    g = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    use_bf16 = args.train_dtype == "bfloat16"
    L = args.seq_len
    model.train()
    losses, step, t0 = [], 0, time.perf_counter()

    def progress():
        return (time.perf_counter() - t0) / args.train_seconds if args.train_seconds else step / args.steps

    while progress() < 1.0:
        starts = torch.randint(0, len(data) - L, (args.batch,), generator=g)
        x = torch.stack([data[s:s + L] for s in starts.tolist()])
        x = torch.cat([torch.full((args.batch, 1), BOS), x], dim=1)
        lr = lr_at(step, progress(), args.warmup, args.lr)
        for grp in opt.param_groups:
            grp["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0:
            recent = losses[-args.log_every:]
            log(f"  step {step:5d}  lr {lr:.2e}  loss {sum(recent) / len(recent):.4f} nats/byte  "
                f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------
# Evaluation.

@torch.no_grad()
def hf_logprobs(model, ids: torch.Tensor, batch: int = 16) -> torch.Tensor:
    out = []
    for i in range(0, len(ids), batch):
        x = ids[i:i + batch]
        lp = torch.log_softmax(model(input_ids=x).logits.float(), dim=-1)
        out.append(lp[:, :-1].gather(2, x[:, 1:].unsqueeze(2)).squeeze(2))
    return torch.cat(out)


@torch.no_grad()
def fake_quant_weights(model, only: str = ""):
    """Quantize->dequantize weights as flexgen's store does (every >= 2-D weight but the
    embeddings and the tied LM head), or, with `only`, just the weights whose name contains it."""
    for name, p in model.named_parameters():
        engine_rule = "embed_" not in name and "lm_head" not in name
        if p.dim() >= 2 and (only in name if only else engine_rule):
            p.copy_(dequantize(quantize(p.detach().float(), WEIGHT_QUANT), torch.float32).reshape(p.shape))


def flexgen_logprobs(ckpt: Path, ids: torch.Tensor, compress_weight: bool, compress_cache: bool,
                     gpu_batch_size: int, work: Path) -> tuple[torch.Tensor, float]:
    policy = Policy(gpu_batch_size=gpu_batch_size, num_gpu_batches=1,
                    compress_weight=compress_weight, compress_cache=compress_cache,
                    w_gpu_percent=100, w_cpu_percent=0, cache_gpu_percent=100, cache_cpu_percent=0,
                    act_gpu_percent=100, act_cpu_percent=0)
    offload = Path(tempfile.mkdtemp(prefix="offload_", dir=work))
    try:
        t = time.perf_counter()
        with flexgen.load_model(str(ckpt), policy, device="cpu", dtype=torch.float32, offload_dir=str(offload)) as m:
            lp = m.score(ids, attention_mask=None, prompt_len=1)
        return lp, time.perf_counter() - t
    finally:
        shutil.rmtree(offload, ignore_errors=True)


def ppl(lp: torch.Tensor) -> float:
    return math.exp(-lp.double().mean().item())


# ---------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="train for a time budget instead of --steps (results then depend on machine speed)")
    ap.add_argument("--steps", type=int, default=900,
                    help="train exactly this many steps, schedule by step (default 900: about 3-4 min here)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=128, help="bytes per sequence (a BOS is prepended)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--train-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="autocast dtype for training (weights and optimizer stay float32)")
    ap.add_argument("--eval-seqs", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=16, help="flexgen gpu_batch_size")
    ap.add_argument("--target", type=float, default=3.0, help="max %% perplexity increase with both (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--keep-checkpoint", default=None, help="also copy the trained checkpoint here")
    args = ap.parse_args(argv)

    def log(msg=""):
        print(msg, flush=True)

    torch.manual_seed(args.seed)
    started = datetime.datetime.now().astimezone()
    log(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    log(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    log(f"date: {started:%Y-%m-%d %H:%M %Z}")

    root, train_files, held_files, train_data, held_data = stdlib_corpus()
    log(f"data: {root}/*.py, {len(train_files)} files / {len(train_data) / 1e6:.2f} MB for training, "
        f"{len(held_files)} held-out files / {len(held_data) / 1e6:.2f} MB "
        f"({', '.join(f.name for f in held_files[:4])}, ...)")
    ids = eval_sequences(held_data, args.eval_seqs, args.seq_len)

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: byte-level OPT, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, ffn {args.ffn}, "
        f"vocab {VOCAB}, {n_params / 1e6:.2f} M params; train seq {args.seq_len}, batch {args.batch}, "
        f"AdamW lr {args.lr:g} warmup {args.warmup} steps then cosine->10% over "
        f"{f'{args.train_seconds:g} s' if args.train_seconds else f'{args.steps} steps'}, {args.train_dtype} autocast")
    losses, train_s = train(model, train_data, args, log)
    q = max(1, math.ceil(len(losses) / 10))
    curve = [sum(losses[i:i + q]) / len(losses[i:i + q]) for i in range(0, len(losses), q)]
    log(f"training: {len(losses)} steps in {train_s:.0f} s; loss (nats/byte) first {losses[0]:.3f}, "
        f"per-tenth means {' '.join(f'{c:.3f}' for c in curve)}, last-{q} mean {curve[-1]:.3f}")

    work = Path(tempfile.mkdtemp(prefix="bench_quant_quality_"))
    failed = []
    try:
        ckpt = work / "checkpoint"
        model.save_pretrained(ckpt)
        if args.keep_checkpoint:
            shutil.copytree(ckpt, args.keep_checkpoint, dirs_exist_ok=True)

        # Plain transformers references (float32).
        hf_lp = hf_logprobs(model, ids)
        hf_ppl = ppl(hf_lp)

        results = {}
        for name, cw, cc in [("full precision", False, False), ("4-bit weights", True, False),
                             ("4-bit cache", False, True), ("4-bit weights + cache", True, True)]:
            lp, secs = flexgen_logprobs(ckpt, ids, cw, cc, args.eval_batch, work)
            results[name] = (lp, secs)
            log(f"  flexgen {name}: ppl {ppl(lp):.5f} ({secs:.1f} s)")

        def simulated(only=""):
            fake = build_model(args)
            fake.load_state_dict(model.state_dict())
            fake.eval()
            fake_quant_weights(fake, only)
            return ppl(hf_logprobs(fake, ids))

        hf_w4_ppl = simulated()
        by_tensor = {label: simulated(key) for label, key in WEIGHT_GROUPS}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    fp_lp = results["full precision"][0]
    fp = ppl(fp_lp)
    n_tok = fp_lp.numel()
    log()
    log(f"held-out: {args.eval_seqs} sequences x {args.seq_len} bytes = {n_tok} bytes scored, prompt_len=1 "
        f"(every byte scored by a decode step through the KV cache), flexgen float32 on CPU, "
        f"gpu_batch_size {args.eval_batch}")
    log(f"| {'config':<23} | {'perplexity':>10} | {'bits/byte':>9} | {'vs full':>8} | {'score s':>7} |")
    log(f"|{'-' * 25}|{'-' * 11}:|{'-' * 10}:|{'-' * 9}:|{'-' * 8}:|")
    for name, (lp, secs) in results.items():
        p = ppl(lp)
        log(f"| {name:<23} | {p:>10.4f} | {math.log2(p):>9.4f} | {100 * (p / fp - 1):>+7.2f}% | {secs:>7.1f} |")

    both = 100 * (ppl(results["4-bit weights + cache"][0]) / fp - 1)
    ok = both <= args.target
    log()
    log(f"target: 4-bit weights + cache {both:+.2f}% <= +{args.target:g}%: {'PASS' if ok else 'FAIL'}")
    if not ok:
        failed.append("target")

    rel = abs(fp / hf_ppl - 1)
    max_diff = (fp_lp - hf_lp).abs().max().item()
    ok_ref = rel < 1e-4
    log(f"sanity: transformers full-precision ppl {hf_ppl:.5f}, flexgen {fp:.5f}, relative diff {rel:.1e}, "
        f"max |dlogprob| {max_diff:.1e}: {'OK' if ok_ref else 'MISMATCH'}")
    if not ok_ref:
        failed.append("flexgen vs transformers")
    w4 = ppl(results["4-bit weights"][0])
    rel_w4 = abs(w4 / hf_w4_ppl - 1)
    ok_w4 = rel_w4 < 1e-3
    log(f"sanity: transformers on quantize->dequantize weights ppl {hf_w4_ppl:.5f}, flexgen 4-bit weights "
        f"{w4:.5f}, relative diff {rel_w4:.1e}: {'OK' if ok_w4 else 'MISMATCH'}")
    if not ok_w4:
        failed.append("4-bit weights vs simulated")
    log("4-bit weights, one tensor kind at a time (simulated in transformers; the rest full precision): " +
        ", ".join(f"{label} {100 * (p / hf_ppl - 1):+.2f}%" for label, p in by_tensor.items()))
    if failed:
        log(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
