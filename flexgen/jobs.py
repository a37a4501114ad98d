"""`python -m flexgen generate`: a resumable JSONL batch job.

Input lines: {"id": ..., "prompt": "...", optional "max_new_tokens", "temperature", "top_p",
"top_k", "stop", "seed"}. Output lines: {"id", "text", "finish_reason", "prompt_tokens",
"generated_tokens"} (+ "logprobs" / "prompt_logprobs" when asked).

Durability: each finished block's lines are appended in one write, flushed and fsynced,
so a run killed at any moment (even SIGKILL) loses at most the block in flight. The next
run with the same command drops a torn last line, skips the ids already written and goes
on; once every id is done the file is rewritten (atomically) in input order, so an
interrupted job ends with the same file as an uninterrupted one. A sidecar
`<output>.meta.json` records the model and settings; resuming with different ones is
refused instead of mixing results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flexgen.errors import FlexGenError

LINE_FIELDS = {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed"}


@dataclass
class InputLine:
    line: int
    id: object
    prompt: str
    overrides: dict


@dataclass
class ParsedInput:
    items: list = field(default_factory=list)     # InputLine, in file order
    bad: list = field(default_factory=list)       # (line number, reason)
    unknown_fields: set = field(default_factory=set)


GENERATE_HELP = ("Generate for every prompt of a JSONL file; resumable. Re-running the same command skips "
                 "ids already in the output.")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `python -m flexgen generate`."""
    from flexgen.cli import add_model_args, add_policy_args

    add_model_args(p)
    p.add_argument("--input", required=True, metavar="JSONL", help='lines {"id": ..., "prompt": ...}')
    p.add_argument("--output", required=True, metavar="JSONL", help="results, appended block by block")
    s = p.add_argument_group("sampling (defaults for lines that do not set them)")
    s.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--stop", nargs="+", metavar="S", help="stop strings")
    s.add_argument("--seed", type=int, help="per-prompt seed for sampling (reproducible)")
    s.add_argument("--logprobs", type=int, metavar="K", help="log-probs of generated tokens and K alternatives")
    s.add_argument("--prompt-logprobs", action="store_true", help="log-probs of the prompt tokens")
    add_policy_args(p)
    p.add_argument("--strict", action="store_true", help="bad input lines are fatal (before any generation)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flexgen generate", description=GENERATE_HELP)
    add_generate_arguments(p)
    return p


# -- input ----------------------------------------------------------------------------

def parse_input(path: Path) -> ParsedInput:
    """Every line of the input, checked; bad ones are collected with their line numbers."""
    out = ParsedInput()
    first_line: dict[str, int] = {}
    try:
        f = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        raise FlexGenError(f"input file not found: {path}") from None
    except OSError as e:
        raise FlexGenError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                out.bad.append((n, f"not JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                out.bad.append((n, "not a JSON object"))
                continue
            if "id" not in obj:
                out.bad.append((n, 'missing "id"'))
                continue
            key = id_key(obj["id"])
            if not (isinstance(obj["id"], str) or (isinstance(obj["id"], int) and not isinstance(obj["id"], bool))):
                out.bad.append((n, '"id" must be a string or an integer'))
                continue
            if not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                out.bad.append((n, 'missing "prompt"' if "prompt" not in obj else '"prompt" must be a non-empty string'))
                continue
            if key in first_line:
                out.bad.append((n, f"duplicate id {obj['id']!r} (first on line {first_line[key]})"))
                continue
            overrides = {k: obj[k] for k in LINE_FIELDS if k in obj}
            out.unknown_fields |= set(obj) - LINE_FIELDS - {"id", "prompt"}
            first_line[key] = n
            out.items.append(InputLine(n, obj["id"], obj["prompt"], overrides))
    return out


def id_key(value) -> str:
    """Ids compare by JSON value: 1 and "1" are different ids."""
    return json.dumps(value)


# -- output ---------------------------------------------------------------------------

def meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def read_done(output: Path) -> dict[str, str]:
    """id key -> its line (with newline) already in the output; a torn last line (no
    newline: the writer died mid-write) is cut off the file."""
    if not output.exists():
        return {}
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with output.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        print(f"flexgen: repaired {output}: dropped a torn last line ({len(data) - keep} bytes)", file=sys.stderr)
        data = data[:keep]
    done = {}
    for n, line in enumerate(data.decode("utf-8").splitlines(keepends=True), start=1):
        try:
            obj = json.loads(line)
            done[id_key(obj["id"])] = line
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FlexGenError(f"{output} line {n} is not a result line; refusing to append to it "
                               "(use another --output)") from None
    return done


def check_meta(output: Path, meta: dict) -> None:
    """Refuse an output made by another model or other settings; record ours otherwise."""
    mp = meta_path(output)
    if mp.exists():
        try:
            old = json.loads(mp.read_text())
        except (OSError, json.JSONDecodeError):
            raise FlexGenError(f"{mp} is unreadable; remove it and {output} to start over") from None
        diff = [k for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k)]
        if diff:
            k = diff[0]
            raise FlexGenError(f"{output} was written with {k} = {old.get(k)!r}, this run has {meta.get(k)!r}; "
                               "use another --output (or remove it and its .meta.json)")
        return
    if output.exists() and output.stat().st_size > 0:
        raise FlexGenError(f"{output} exists and was not written by `flexgen generate` (no {mp.name}); "
                           "use another --output")
    _atomic_write(mp, json.dumps(meta, indent=2) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def result_line(item: InputLine, out) -> str:
    obj = {"id": item.id, "text": out.text, "finish_reason": out.finish_reason,
           "prompt_tokens": len(out.prompt_token_ids), "generated_tokens": len(out.token_ids)}
    if out.logprobs is not None:
        obj["logprobs"] = [_lp(x) for x in out.logprobs]
    if out.prompt_logprobs is not None:
        obj["prompt_logprobs"] = [None if x is None else _lp(x) for x in out.prompt_logprobs]
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _lp(x) -> dict:
    d = {"token_id": x.token_id, "logprob": round(x.logprob, 6)}
    if x.top:
        d["top"] = [[t, round(v, 6)] for t, v in x.top]
    return d


# -- the job --------------------------------------------------------------------------

def model_fingerprint(model: str, dummy: bool) -> str:
    """What identifies the weights: the checkpoint's path and config, or the dummy name."""
    path = Path(model).expanduser()
    if dummy or not path.is_dir():
        return f"{'dummy:' if dummy else ''}{model}"
    cfg = path / "config.json"
    digest = hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.is_file() else "-"
    return f"{path.resolve()} (config {digest})"


def generate_main(argv: list[str]) -> int:
    return generate_run(build_parser().parse_args(argv))


def generate_run(a) -> int:
    """`python -m flexgen generate` with parsed flags."""
    import torch

    from flexgen.cli import llm_from_args
    from flexgen.device import default_dtype, dtype_name
    from flexgen.llm import SamplingParams

    t0 = time.perf_counter()
    inp, out_path = Path(a.input).expanduser(), Path(a.output).expanduser()
    if not out_path.parent.is_dir():
        raise FlexGenError(f"output directory {out_path.parent} does not exist")
    if out_path.is_dir():
        raise FlexGenError(f"--output {out_path} is a directory")
    if not os.access(out_path.parent, os.W_OK):
        raise FlexGenError(f"output directory {out_path.parent} is not writable")
    defaults = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                    stop=tuple(a.stop) if a.stop else None, seed=a.seed, logprobs=a.logprobs,
                    prompt_logprobs=a.prompt_logprobs)
    SamplingParams(**defaults)   # bad flags fail here, before any work
    parsed = parse_input(inp)
    params = []
    for item in parsed.items:
        try:
            params.append(SamplingParams(**{**defaults, **item.overrides}))
        except (FlexGenError, TypeError) as e:
            parsed.bad.append((item.line, str(e)))
            params.append(None)
    parsed.bad.sort()
    for n, why in parsed.bad:
        print(f"flexgen: {inp}:{n}: {why}", file=sys.stderr)
    if parsed.unknown_fields:
        print(f"flexgen: ignoring unknown input fields: {', '.join(sorted(parsed.unknown_fields))}", file=sys.stderr)
    if parsed.bad and a.strict:
        raise FlexGenError(f"{len(parsed.bad)} bad input line(s) (first: line {parsed.bad[0][0]}); "
                           "nothing generated (--strict)")
    valid = [(item, p) for item, p in zip(parsed.items, params) if p is not None]

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype or dtype_name(default_dtype(torch.device(device)))
    meta = {"model": model_fingerprint(a.model, a.dummy), "dtype": dtype,
            "compress_weight": bool(a.compress_weight), "compress_cache": bool(a.compress_cache),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}}
    check_meta(out_path, meta)
    done = read_done(out_path)
    todo = [(item, p) for item, p in valid if id_key(item.id) not in done]
    skipped = len(valid) - len(todo)
    stats = {"done": 0, "failed": 0, "tokens": 0}
    if todo:
        _run(a, llm_from_args, todo, out_path, stats)
    wall = time.perf_counter() - t0
    complete = stats["failed"] == 0
    if complete and valid:
        _reorder(out_path, [id_key(item.id) for item, _ in valid])
    print(f"flexgen generate: {stats['done']} sequences done, {skipped} already in {out_path}, "
          f"{len(parsed.bad)} bad input lines skipped, {stats['failed']} failed; {stats['tokens']} tokens in "
          f"{wall:.1f} s ({stats['tokens'] / wall if wall else 0:.2f} token/s)")
    return 0 if complete else 1


def _run(a, llm_from_args, todo, out_path: Path, stats: dict) -> None:
    with llm_from_args(a, progress=not a.quiet) as llm:
        if llm.tokenizer is None:
            raise FlexGenError(f"{a.model} has no tokenizer: text prompts cannot be encoded")
        ids, keep = [], []
        for item, p in todo:   # too long for the model: reported and left out, the rest goes on
            t = llm.tokenizer(item.prompt)["input_ids"]
            if len(t) + max(1, p.max_new_tokens) > llm.args.max_position_embeddings:
                print(f"flexgen: line {item.line} (id {item.id!r}): {len(t)} prompt tokens + {p.max_new_tokens} "
                      f"new exceed the model's {llm.args.max_position_embeddings} positions; skipped",
                      file=sys.stderr)
                stats["failed"] += 1
                continue
            ids.append(t)
            keep.append((item, p))
        if not keep:
            return
        with out_path.open("ab") as f:
            for pairs in llm.generate_blocks(ids, [p for _, p in keep], progress=not a.quiet):
                data = "".join(result_line(keep[i][0], out) for i, out in pairs).encode("utf-8")
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                stats["done"] += len(pairs)
                stats["tokens"] += sum(len(out.token_ids) for _, out in pairs)


def _reorder(out_path: Path, order: list[str]) -> None:
    """Rewrite a complete output in input order (atomically), if it is not already."""
    done = read_done(out_path)
    wanted = set(order)
    lines = [done[k] for k in order if k in done]
    extra = [line for k, line in done.items() if k not in wanted]   # ids no longer in the input: keep
    if list(done) == order and not extra:
        return
    _atomic_write(out_path, "".join(lines + extra))


__all__ = ["generate_main", "parse_input", "read_done"]
