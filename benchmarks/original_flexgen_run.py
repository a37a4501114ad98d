"""Run the original FlexGen (PyPI flexgen 0.1.8) offline; used by benchmarks/gpu_compare.py.

Runs under the interpreter of a virtual environment that holds the original package (never
with this repository on sys.path: both packages are called `flexgen`). The original loads
its tokenizer from the Hugging Face hub; with dummy weights token ids only make up the
prompts, so `AutoTokenizer.from_pretrained` is patched to return a small word-level
tokenizer built here with the `tokenizers` library (OPT's special ids: <s> 0, <pad> 1,
</s> 2). Then the original's own `flex_opt.run_flexgen` runs with the flags given after
`--`, and the figures of its benchmark log (prefill / decode / total latency and
throughput, peak GPU memory) are written as JSON.

    python original_flexgen_run.py --json-out r.json --gpu-cap-gib 16 -- --model facebook/opt-30b \
        --path _DUMMY_ --percent 20 80 0 100 0 100 --gpu-batch-size 48 --num-gpu-batches 1 --cpu-cache-compute
    python original_flexgen_run.py --check --json-out r.json -- <the same flags>   # no CUDA: import + flags only
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
WORDS = "Paris is the capital city of France and a large city".split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left")


def parse_log(text: str) -> dict:
    """The original's write_benchmark_log lines: 'prefill latency: 1.234 s', 'peak gpu mem: 3.2 GB'."""
    out = {}
    for key, name in (("prefill latency", "prefill_s"), ("decode latency", "decode_s"), ("total latency", "total_s"),
                      ("prefill throughput", "prefill_tok_s"), ("decode throughput", "decode_tok_s"),
                      ("total throughput", "throughput"), ("peak gpu mem", "peak_gpu_gb"),
                      ("model size", "model_gb"), ("cache size", "cache_gb")):
        m = re.findall(rf"{key}: ([0-9.eE+-]+)", text)
        if m:
            out[name] = float(m[-1])
    m = re.findall(r"projected: (True|False)", text)
    if m:
        out["projected"] = m[-1] == "True"
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--json-out", required=True)
    ap.add_argument("--gpu-cap-gib", type=float, default=16.0)
    ap.add_argument("--check", action="store_true", help="import, tokenizer and flags only (no CUDA needed)")
    a = ap.parse_args(own)
    import importlib.metadata

    import torch
    import transformers

    import flexgen
    from flexgen import flex_opt
    info = {"flexgen_file": flexgen.__file__, "version": importlib.metadata.version("flexgen")}
    if not info["version"].startswith("0.1."):
        raise SystemExit(f"original_flexgen_run: imported flexgen {info['version']} from {flexgen.__file__}, "
                         "not the original 0.1.x")
    tok = make_tokenizer()
    transformers.AutoTokenizer.from_pretrained = lambda *args, **kw: tok
    parser = argparse.ArgumentParser()
    flex_opt.add_parser_arguments(parser)
    log = Path(tempfile.mkdtemp(prefix="orig-flexgen-")) / "bench.log"
    args = parser.parse_args(rest + ["--log-file", str(log)])
    assert len(args.percent) == 6
    ids = flex_opt.get_test_inputs(args.prompt_len, 2, transformers.AutoTokenizer.from_pretrained("facebook/opt-30b"))
    assert len(ids[0]) == args.prompt_len, "tokenizer did not pad to the prompt length"
    info["args"] = vars(args)
    if a.check:
        info["check"] = "ok"
        Path(a.json_out).write_text(json.dumps(info, default=str))
        return 0
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, a.gpu_cap_gib * GIB / total))
    Path(args.offload_dir).expanduser().mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    flex_opt.run_flexgen(args)
    info["wall_s"] = time.perf_counter() - t0
    info.update(parse_log(log.read_text()))
    info["peak_gpu_reserved"] = torch.cuda.max_memory_reserved()
    Path(a.json_out).write_text(json.dumps(info, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
