"""flexgen.LLM (text in, text out) against transformers at fp32."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import flexgen
from flexgen import LLM, FlexGenError, Policy, SamplingParams

WORDS = "Paris is the capital city of France the quick brown fox jumps over lazy dog def generate model".split()


def mixed_prompts(n=22, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 14, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return out


def P(**kw):
    base = dict(gpu_batch_size=3, num_gpu_batches=2, w_gpu_percent=40, w_cpu_percent=30, cache_gpu_percent=50,
                cache_cpu_percent=25, act_gpu_percent=50, act_cpu_percent=50)
    base.update(kw)
    return Policy(**base)


def llm_for(path, offload, policy=None, **kw):
    return LLM(str(path), policy or P(), device="cpu", dtype=torch.float32, offload_dir=offload, **kw)


def hf_greedy(model, tok, prompt, n):
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=1, eos_token_id=model.config.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def hf_logprobs(model, ids):
    """(len(ids), vocab) fp32 log-softmax of the logits at each position of one sequence."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.fixture(scope="module")
def tok(opt_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(opt_dir[0]))


def test_greedy_matches_transformers_per_prompt(opt_dir, tok, offload):
    """22 prompts of 2..14 tokens in blocks of 6: four blocks, the last one partial."""
    path, model = opt_dir
    prompts = mixed_prompts()
    with llm_for(path, offload) as llm:
        outs = llm.generate(prompts, SamplingParams(max_new_tokens=7), progress=False)
    assert len({o.block.index for o in outs}) == 4
    assert sorted(o.block.batch_size for o in outs).count(4) == 4  # the partial block
    for prompt, out in zip(prompts, outs):
        ref = hf_greedy(model, tok, prompt, 7)
        assert out.prompt == prompt and out.prompt_token_ids == tok(prompt)["input_ids"]
        assert out.token_ids == ref, prompt
        assert out.text == tok.decode(ref, skip_special_tokens=True)
        assert out.finish_reason == ("eos" if ref[-1] == model.config.eos_token_id else "length")


def test_logprobs_and_prompt_logprobs_match_transformers(opt_dir, tok, offload):
    path, model = opt_dir
    prompts = mixed_prompts(8, seed=1)
    params = SamplingParams(max_new_tokens=5, logprobs=3, prompt_logprobs=True)
    with llm_for(path, offload, P(cache_gpu_percent=0, cache_cpu_percent=50, cpu_cache_compute=True)) as llm:
        outs = llm.generate(prompts, params, progress=False)
    for out in outs:
        seq = out.prompt_token_ids + out.token_ids
        ref = hf_logprobs(model, seq)
        n = len(out.prompt_token_ids)
        assert len(out.logprobs) == len(out.token_ids) == 5
        for s, lp in enumerate(out.logprobs):
            row = ref[n - 1 + s]
            assert lp.token_id == seq[n + s]
            assert abs(lp.logprob - float(row[lp.token_id])) < 1e-4
            top = row.topk(3)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top.values, rtol=0, atol=1e-4)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
        for c in range(1, n):
            lp = out.prompt_logprobs[c]
            assert lp.token_id == seq[c]
            assert abs(lp.logprob - float(ref[c - 1, seq[c]])) < 1e-4
            assert [t for t, _ in lp.top] == ref[c - 1].topk(3).indices.tolist()


def test_score_only_with_zero_new_tokens(opt_dir, offload):
    path, model = opt_dir
    ids = [[5, 17, 200, 33, 41, 8], [9, 10]]
    with llm_for(path, offload) as llm:
        outs = llm.generate(ids, SamplingParams(max_new_tokens=0, prompt_logprobs=True, echo=True), progress=False)
    for seq, out in zip(ids, outs):
        assert out.token_ids == [] and out.finish_reason == "length"
        ref = hf_logprobs(model, seq)
        got = [lp.logprob for lp in out.prompt_logprobs[1:]]
        want = [float(ref[c - 1, seq[c]]) for c in range(1, len(seq))]
        assert got == pytest.approx(want, abs=1e-4)
        assert out.text == llm.tokenizer.decode(seq, skip_special_tokens=True)   # echo


def test_stop_strings_truncate_and_span_tokens(opt_dir, tok, offload):
    path, _ = opt_dir
    prompts = mixed_prompts(6, seed=2)
    sampled = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=100 + i) for i in range(6)]
    with llm_for(path, offload) as llm:
        full = llm.generate(prompts, sampled, progress=False)
        # A stop string across the boundary of the 3rd and 4th generated tokens of each row.
        stops = []
        for o in full:
            a, b = tok.decode(o.token_ids[:3]), tok.decode(o.token_ids[:4])
            stops.append(b[len(a) - 1:len(a) + 1] if len(b) > len(a) >= 1 else None)
        params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=100 + i, stop=[s] if s else None)
                  for i, s in enumerate(stops)]
        cut = llm.generate(prompts, params, progress=False)
    tested = 0
    for f, c, s in zip(full, cut, stops):
        if s is None:
            continue
        tested += 1
        pos = f.text.find(s)
        assert pos >= 0
        assert c.text == f.text[:pos] and c.finish_reason == "stop"
        assert len(c.token_ids) <= 4 and c.token_ids == f.token_ids[:len(c.token_ids)]
    assert tested >= 3


def test_eos_and_stop_token_ids(opt_dir, tok, tmp_path, offload):
    path, model = opt_dir
    prompt = "Paris is the capital"
    ref = hf_greedy(model, tok, prompt, 6)
    # The same weights with the model's 3rd greedy token declared as EOS.
    d = tmp_path / "eos-ckpt"
    shutil.copytree(path, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = ref[2]
    (d / "config.json").write_text(json.dumps(cfg))
    first = ref.index(ref[2])
    with llm_for(d, offload) as llm:
        eos, ignored = llm.generate([prompt, prompt], [SamplingParams(max_new_tokens=6),
                                                       SamplingParams(max_new_tokens=6, ignore_eos=True)],
                                    progress=False)
    assert eos.finish_reason == "eos" and eos.token_ids == ref[:first + 1]
    assert ignored.finish_reason == "length" and ignored.token_ids == ref
    with llm_for(path, offload) as llm:
        (out,) = llm.generate([prompt], SamplingParams(max_new_tokens=6, stop_token_ids=[ref[1]]), progress=False)
    assert out.finish_reason == "stop" and out.token_ids == ref[:ref.index(ref[1]) + 1]


def test_seed_reproducible_whatever_order_and_block(opt_dir, offload):
    path, _ = opt_dir
    prompts = mixed_prompts(7, seed=3)
    params = [SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.95, top_k=50, seed=i) for i in range(7)]
    with llm_for(path, offload) as llm:
        a = llm.generate(prompts, params, progress=False)
    perm = [6, 2, 0, 5, 1, 3, 4]
    with llm_for(path, offload, P(gpu_batch_size=2, num_gpu_batches=1)) as llm:
        b = llm.generate([prompts[i] for i in perm], [params[i] for i in perm], progress=False)
        greedy = llm.generate(prompts, SamplingParams(max_new_tokens=6), progress=False)
    for j, i in enumerate(perm):
        assert b[j].token_ids == a[i].token_ids
    assert any(x.token_ids != g.token_ids for x, g in zip(a, greedy))   # it really samples


def test_mixed_settings_in_one_block(opt_dir, tok, offload):
    """Rows with different max_new_tokens and temperatures share blocks; greedy rows stay greedy."""
    path, model = opt_dir
    prompts = mixed_prompts(6, seed=4)
    params = [SamplingParams(max_new_tokens=2 + i, temperature=0.0 if i % 2 == 0 else 1.0, seed=i) for i in range(6)]
    with llm_for(path, offload) as llm:
        outs = llm.generate(prompts, params, progress=False)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert len(o.token_ids) <= 2 + i
        if i % 2 == 0:
            assert o.token_ids == hf_greedy(model, tok, p, 2 + i)


@pytest.mark.parametrize("kw,msg", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                    (dict(top_k=-2), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens"),
                                    (dict(stop=[""]), "stop"), (dict(logprobs=-1), "logprobs"),
                                    (dict(seed="x"), "seed"), (dict(stop_token_ids=[1.5]), "stop_token_ids")])
def test_invalid_sampling_params(kw, msg):
    with pytest.raises(FlexGenError, match=msg):
        SamplingParams(**kw)


def test_bad_prompts_are_one_line_errors(opt_dir, offload):
    path, _ = opt_dir
    with llm_for(path, offload) as llm:
        with pytest.raises(FlexGenError, match="empty"):
            llm.generate([[]], progress=False)
        with pytest.raises(FlexGenError, match="outside the vocabulary"):
            llm.generate([[1, 10**6]], progress=False)
        with pytest.raises(FlexGenError, match="positions"):
            llm.generate(["Paris " * 200], progress=False)
        with pytest.raises(FlexGenError, match="sampling params"):
            llm.generate(["a", "b"], [SamplingParams()], progress=False)
        assert llm.generate([], progress=False) == []
    assert not list(offload.glob("run-*"))


def test_auto_policy_replans_for_longer_prompts(opt_dir, offload, capsys):
    path, _ = opt_dir
    with LLM(str(path), device="cpu", dtype=torch.float32, offload_dir=offload, gpu_mem=15, cpu_mem=200,
             disk_mem=100, hardware="t4") as llm:
        short = llm.generate(["Paris is"], SamplingParams(max_new_tokens=4), progress=False)
        first = llm._planned
        assert llm.policy.block_size == 1     # shrunk to the batch
        llm.generate(["Paris is the capital city of France " * 3], SamplingParams(max_new_tokens=30),
                     progress=False)
        assert sum(first[:2]) < sum(llm._planned[:2])
        again = llm.generate(["Paris is"], SamplingParams(max_new_tokens=4), progress=False)
        llm.generate(["Paris is", "the capital"], SamplingParams(max_new_tokens=4), progress=False)
        assert llm.policy.block_size >= 2     # a larger batch: chosen again
    assert again[0].token_ids == short[0].token_ids
    assert capsys.readouterr().err.count("flexgen: policy for prompts") == 3


def test_dummy_model_with_token_ids(offload):
    with LLM("opt-125m", Policy(gpu_batch_size=2), dummy=True, device="cpu", dtype=torch.float32,
             offload_dir=offload) as llm:
        assert llm.tokenizer is None
        outs = llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=3), progress=False)
        with pytest.raises(FlexGenError, match="tokenizer"):
            llm.generate(["text"], progress=False)
    assert [len(o.token_ids) for o in outs] == [3, 3] and outs[0].text == ""


def test_public_names():
    for name in ("LLM", "SamplingParams", "RequestOutput", "TokenLogprob", "BlockInfo"):
        assert hasattr(flexgen, name)


@pytest.mark.parametrize("family,overrides", [("llama", dict(num_key_value_heads=2, rope_theta=500000.0)),
                                              ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True))])
def test_llm_on_llama_layout_families(tmp_path, offload, family, overrides):
    """The batch API through the family seam: greedy tokens and logprobs equal transformers'."""
    from conftest import _train_tokenizer
    from test_families import make_family_checkpoint
    d = tmp_path / family
    model = make_family_checkpoint(d, family, seed=7, **overrides)
    tok = _train_tokenizer(d)
    prompts = mixed_prompts(9, seed=5)
    with llm_for(d, offload, P(cpu_cache_compute=True)) as llm:
        outs = llm.generate(prompts, SamplingParams(max_new_tokens=5, logprobs=1, prompt_logprobs=True),
                            progress=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(model, tok, prompt, 5)
        seq = out.prompt_token_ids + out.token_ids
        ref = hf_logprobs(model, seq)
        n = len(out.prompt_token_ids)
        for s, lp in enumerate(out.logprobs):
            assert abs(lp.logprob - float(ref[n - 1 + s, lp.token_id])) < 1e-4
        for c in range(1, n):
            assert abs(out.prompt_logprobs[c].logprob - float(ref[c - 1, seq[c]])) < 1e-4
