"""HELM batch runner and client (flexgen.helm), offline, on a tiny random OPT.

The `helm` tests need the helm extra (crfm-helm); outside CI they are skipped when it is not
installed, in CI (CI=true) its absence fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
RUNS = ["synthetic_reasoning:mode=pattern_match", "dyck_language:num_parenthesis_pairs=2"]


def _have_helm() -> bool:
    try:
        import helm.benchmark.runner  # noqa: F401
        return True
    except ImportError:
        return False


def needs_helm(test):
    skip = pytest.mark.skipif(not _have_helm() and os.environ.get("CI") != "true",
                              reason="crfm-helm not installed (pip install 'flexgen[helm]')")
    return pytest.mark.helm(skip(test))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt-helm")
    model = make_checkpoint(d, max_position_embeddings=256)
    return d, model


def _env():
    env = dict(os.environ, **OFFLINE)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_import_flexgen_does_not_import_helm():
    code = "import sys, flexgen, flexgen.cli; assert not any(m == 'helm' or m.startswith('helm.') " \
           "for m in sys.modules), sorted(m for m in sys.modules if m.startswith('helm'))"
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())


def test_missing_helm_is_one_line_naming_the_extra(tmp_path):
    code = ("import sys; sys.modules['helm'] = None; from flexgen.cli import main; "
            "sys.exit(main(['helm', '--model', 'x', '--description', 'simple1:']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flexgen: error:"), r.stderr
    assert "pip install 'flexgen[helm]'" in lines[0] and "torch" in lines[0]


@pytest.mark.parametrize("argv, msg", [
    (["--model", "m"], "--description"),
    (["--model", "m", "--description", "simple1:", "--max-eval-instances", "0"], "--max-eval-instances"),
    (["--model", "m", "--description", "simple1:", "--gpu-mem", "-1"], "--gpu-mem"),
    (["--model", "opt-125m", "--dummy", "--description", "simple1:"], "tokenizer"),
])
def test_cli_user_mistakes(argv, msg):
    from flexgen.errors import FlexGenError
    from flexgen.helm.cli import helm_main

    with pytest.raises(FlexGenError, match=msg):
        helm_main(argv)


@pytest.fixture
def engine(monkeypatch):
    """flexgen.LLM, with a record of the number of prompts in every generate call."""
    import flexgen

    calls: list[int] = []
    original = flexgen.LLM.generate

    def generate(self, prompts, params=None, **kw):
        calls.append(len(prompts))
        return original(self, prompts, params, **kw)

    monkeypatch.setattr(flexgen.LLM, "generate", generate)
    return calls


def _run_dir(out: Path, suite: str, prefix: str) -> Path:
    dirs = [d for d in (out / "runs" / suite).iterdir() if d.name.startswith(prefix)]
    assert len(dirs) == 1, list((out / "runs" / suite).iterdir())
    return dirs[0]


def _stat_names(run: Path) -> set[str]:
    return {s["name"]["name"] for s in json.loads((run / "stats.json").read_text())}


def _batch_sizes(run: Path) -> list[int]:
    states = json.loads((run / "scenario_state.json").read_text())["request_states"]
    assert states and all(s["result"]["batch_request_time"] > 0 for s in states)
    return [s["result"]["batch_size"] for s in states]


@needs_helm
def test_batch_runner_end_to_end(ckpt, engine, tmp_path, capsys):
    from flexgen.cli import main

    out = tmp_path / "out"
    argv = ["helm", "--model", str(ckpt[0]), "--model-name", "flexgen/tiny-e2e", "--max-eval-instances", "6",
            "--output-path", str(out), "--suite", "ci", "--gpu-batch-size", "4", "--num-gpu-batches", "2",
            "--device", "cpu", "--dtype", "float32", "--offload-dir", str(tmp_path / "offload"), "--quiet"]
    for d in RUNS:
        argv += ["--description", d]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "exact_match" in printed and "helm-summarize --suite ci" in printed

    # one batch job per run, each holding every request of the run
    assert len(engine) == 2 and all(n > 1 for n in engine), engine
    for prefix, metric in (("synthetic_reasoning", "exact_match"), ("dyck_language", "exact_match_indicator")):
        run = _run_dir(out, "ci", prefix)
        for f in ("run_spec.json", "scenario_state.json", "stats.json", "per_instance_stats.json"):
            assert (run / f).is_file(), f
        assert metric in _stat_names(run)
        assert "num_instances" in _stat_names(run)
        assert max(_batch_sizes(run)) > 1

    summarize = Path(sys.executable).with_name("helm-summarize")
    r = subprocess.run([str(summarize), "--suite", "ci", "--output-path", str(out)], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "runs" / "ci" / "summary.json").is_file()


@needs_helm
@pytest.mark.parametrize("description, msg", [("no_such_scenario:x=1", "Unknown run spec name"),
                                               ("dyck_language:no_such_arg=2", "no_such_arg"),
                                               ("dyck_language:num_parenthesis_pairs=2,model=x", "leave model= out")])
def test_cli_bad_description_is_one_error(ckpt, engine, tmp_path, description, msg):
    from flexgen.errors import FlexGenError
    from flexgen.helm.cli import helm_main

    with pytest.raises(FlexGenError, match=msg):
        helm_main(["--model", str(ckpt[0]), "--model-name", "flexgen/tiny-bad", "--description", description,
                   "--output-path", str(tmp_path / "out")])
    assert engine == []  # nothing was run


@needs_helm
def test_cli_scenario_download_failure_is_one_error(ckpt, monkeypatch, tmp_path):
    from urllib.error import URLError

    import flexgen.helm.runner
    from flexgen.errors import FlexGenError
    from flexgen.helm.cli import helm_main

    def offline_scenario(*args, **kwargs):  # what a scenario that downloads its data raises offline
        raise URLError("Name or service not known")

    monkeypatch.setattr(flexgen.helm.runner, "run_helm", offline_scenario)
    with pytest.raises(FlexGenError, match="downloads its data"):
        helm_main(["--model", str(ckpt[0]), "--model-name", "flexgen/tiny-net", "--description", "simple1:",
                   "--gpu-batch-size", "2", "--device", "cpu", "--offload-dir", str(tmp_path / "off"), "--quiet"])


def _request(name: str, prompt: str, **kw):
    from helm.common.request import Request

    return Request(model=name, model_deployment=name, prompt=prompt, **kw)


@needs_helm
def test_logprobs_and_echo_match_transformers(ckpt, engine, tmp_path):
    import flexgen
    from flexgen.helm.convert import generate

    d, ref = ckpt
    prompt = "Paris is the capital city of France. The quick"
    name = "flexgen/tiny-lp"
    llm = flexgen.LLM(str(d), flexgen.Policy(gpu_batch_size=4), device="cpu", dtype="float32",
                      offload_dir=str(tmp_path / "offload"))
    try:
        echo, gen, two = generate(llm, [
            _request(name, prompt, temperature=0.0, max_tokens=0, echo_prompt=True),
            _request(name, prompt, temperature=0.0, max_tokens=5, stop_sequences=[]),
            _request(name, "The quick brown", temperature=1.0, max_tokens=3, num_completions=2, random="r"),
        ], max_sequence_length=256)
        tok = llm.tokenizer
    finally:
        llm.close()
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        lp = ref(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = [0.0] + [lp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]

    # echo with no new tokens: the prompt's own tokens, each with its log-probability (language modelling)
    (c,) = echo.completions
    assert [t.text for t in c.tokens] == [tok.decode([t]) for t in ids]
    assert [t.logprob for t in c.tokens] == pytest.approx(want, abs=2e-3)
    assert c.logprob == pytest.approx(sum(want), abs=1e-2)
    assert c.text == tok.decode(ids)

    # greedy generation: the chosen tokens' log-probabilities are the reference model's
    (c,) = gen.completions
    seq, ref_lps = list(ids), []
    with torch.no_grad():
        for _ in range(len(c.tokens)):
            lps = ref(torch.tensor([seq])).logits[0, -1].float().log_softmax(-1)
            seq.append(int(lps.argmax()))
            ref_lps.append(lps[seq[-1]].item())
    assert len(c.tokens) == 5 or c.finish_reason["reason"] == "eos"
    assert [t.logprob for t in c.tokens] == pytest.approx(ref_lps, abs=2e-3)
    assert [t.text for t in c.tokens] == [tok.decode([t]) for t in seq[len(ids):]]

    # several completions of one request, sampled, each its own sequence in the batch
    assert len(two.completions) == 2 and all(len(c.tokens) <= 3 for c in two.completions)
    for r in (echo, gen, two):
        assert r.success and r.batch_size >= 1 and r.batch_request_time > 0


@needs_helm
def test_stop_sequence_keeps_whole_tokens_before_the_cut(ckpt):
    from transformers import AutoTokenizer

    from flexgen.helm.convert import _kept_tokens

    tok = AutoTokenizer.from_pretrained(str(ckpt[0]))
    ids = tok("Paris is\nthe capital")["input_ids"]
    k = _kept_tokens(ids, "Paris is", tok)
    assert tok.decode(ids[:k]) == "Paris is"
    assert _kept_tokens(ids, tok.decode(ids), tok) == len(ids)
    assert _kept_tokens(ids, "", tok) == 0


@needs_helm
def test_helm_run_with_flexgen_client(ckpt, tmp_path):
    """The documented helm-run route: configs from --write-config, HELM's own runner (one request at a
    time through FlexGenClient) and the batching runner."""
    cfg, out = tmp_path / "prod_env", tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "flexgen", "helm", "--model", str(ckpt[0]), "--model-name",
                        "flexgen/tiny-client", "--write-config", str(cfg), "--gpu-batch-size", "4", "--device", "cpu",
                        "--dtype", "float32", "--offload-dir", str(tmp_path / "offload")],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "helm-run --local-path" in r.stdout
    deployments = (cfg / "model_deployments.yaml").read_text()
    assert "flexgen.helm.client.FlexGenClient" in deployments and "flexgen_policy.json" in deployments
    helm_run = Path(sys.executable).with_name("helm-run")
    for suite, extra in (("plain", []), ("batched", ["--runner-class-name", "flexgen.helm.runner.FlexGenRunner"])):
        r = subprocess.run([str(helm_run), "--local-path", str(cfg), "--output-path", str(out), "--suite", suite,
                            "--run-entries", "dyck_language:num_parenthesis_pairs=2,model=flexgen/tiny-client",
                            "--max-eval-instances", "3", "--disable-cache", "--exit-on-error", *extra],
                           capture_output=True, text=True, env=_env(), timeout=600)
        log = r.stdout + r.stderr
        assert r.returncode == 0, log[-4000:]
        assert "Retrying" not in log, log[-4000:]  # HELM's client threads share one engine: no failed requests
        assert "nltk_data" not in log  # offline: no download attempt
        run = _run_dir(out, suite, "dyck_language")
        assert "exact_match_indicator" in _stat_names(run)
        sizes = _batch_sizes(run)
        assert (max(sizes) == 1) if suite == "plain" else (max(sizes) > 1), sizes
