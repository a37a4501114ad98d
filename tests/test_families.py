"""LLaMA-layout families (llama, mistral, qwen2) against transformers, fp32, across placements.

Tiny random checkpoints: grouped-query attention (kv heads < heads) and plain multi-head,
tied and untied heads, Llama 3.1 rope scaling, Qwen2's q/k/v bias, Mistral's sliding
window shorter than prompt + generation.
"""

from __future__ import annotations

import pytest
import torch

import flexgen
from conftest import VOCAB
from flexgen.errors import FlexGenError
from test_engine import GEN, POLICIES, hf_reference, run

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB,
            max_position_embeddings=96, pad_token_id=1, bos_token_id=0, eos_token_id=2)

CHECKPOINTS = {
    # family, config overrides
    "llama-gqa": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0)),
    "llama-tied-rope3": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                       rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=8)),
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-untied-mha": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1e6)),
}


def make_family_checkpoint(directory, family, seed=0, **overrides):
    import transformers

    cfg_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                          "mistral": ("MistralConfig", "MistralForCausalLM"),
                          "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[family]
    torch.manual_seed(seed)
    kw = dict(TINY, tie_word_embeddings=False)
    kw.update(overrides)
    config = getattr(transformers, cfg_cls)(**kw)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0; make them matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            family, overrides = CHECKPOINTS[name]
            d = tmp_path_factory.mktemp(name)
            made[name] = (d, make_family_checkpoint(d, family, seed=len(made), **overrides))
        return made[name]
    return get


SUBSET = ["all-gpu", "mixed-30-30-40", "ngb4", "cpu-cache-compute-disk", "all-disk-ngb4-seq"]
CASES = ([("llama-gqa", n) for n in POLICIES]
         + [(c, n) for c in CHECKPOINTS if c != "llama-gqa" for n in SUBSET])


@pytest.mark.parametrize("checkpoint,name", CASES, ids=[f"{c}-{n}" for c, n in CASES])
def test_matches_transformers(checkpoints, prompts, offload, checkpoint, name):
    path, model = checkpoints(checkpoint)
    ids, mask = prompts
    ref_seq, ref_logits = hf_reference(model, ids, mask)
    seq, logits = run(path, POLICIES[name], ids, mask, offload)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_kv_cache_is_gqa_sized(checkpoints, offload):
    """The cache holds num_key_value_heads * head_dim values per token, not hidden_size."""
    path, _ = checkpoints("llama-gqa")
    ids = torch.randint(4, VOCAB, (2, 5))
    with flexgen.load_model(str(path), POLICIES["all-gpu"], device="cpu", dtype=torch.float32,
                            offload_dir=offload) as m:
        assert m.args.kv_width == 32
        m.generate(ids, max_new_tokens=3)
        # 2 layers x gbs 2 rows x (5 + 3) positions x (K + V) x 32 values x 4 bytes
        assert m.stats.cache_bytes["gpu"] == 2 * 2 * 8 * 2 * 32 * 4


def test_score_matches_transformers_logprobs(checkpoints, prompts, offload):
    path, model = checkpoints("qwen2-tied")
    ids = prompts[0][[0, 4]]
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits.float(), dim=-1)
    ref = ref[:, 2:-1].gather(2, ids[:, 3:].unsqueeze(2)).squeeze(2)
    with flexgen.load_model(str(path), POLICIES["ngb4"], device="cpu", dtype=torch.float32,
                            offload_dir=offload) as m:
        got = m.score(ids, prompt_len=3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags", [dict(compress_weight=True), dict(compress_cache=True),
                                   dict(compress_weight=True, compress_cache=True)], ids=lambda f: "+".join(f))
def test_4bit_matches_fake_quantized_reference(tmp_path_factory, prompts, tmp_path, flags):
    """As tests/test_compress.py for OPT: GQA K/V of 2 heads x 64 = two cache groups per token."""
    from flexgen import Policy
    from test_compress import PLACEMENTS, fake_quant_weights
    from test_compress import hf_reference as fq_reference
    from test_compress import run as run_q
    d = tmp_path_factory.mktemp("llama-q")
    model = make_family_checkpoint(d, "llama", seed=7, hidden_size=256, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=256)
    ids, mask = prompts
    ref_model = _WithPositions(fake_quant_weights(model) if flags.get("compress_weight") else model)
    ref_seq, ref_logits = fq_reference(ref_model, ids, mask, quant_cache=flags.get("compress_cache", False))
    for name, p in PLACEMENTS.items():
        p = Policy(**{**p.to_dict(), **flags})
        seq, logits = run_q(d, p, ids, mask, tmp_path / name)
        assert torch.equal(seq, ref_seq), name
        torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3, msg=name)


class _WithPositions:
    """A LLaMA model called as generate() would: positions from the attention mask.
    Called directly, transformers numbers positions by cache slot, padding included."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, attention_mask, **kw):
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=pos[:, -input_ids.shape[1]:], **kw)


def test_unknown_rope_scaling_refused(tmp_path):
    from flexgen.models.registry import args_from_config
    cfg = dict(TINY, model_type="llama", rope_scaling=dict(rope_type="yarn", factor=4.0))
    with pytest.raises(FlexGenError, match="rope_scaling type 'yarn' is not supported"):
        args_from_config(cfg, "x")


def test_named_sizes_parameter_counts():
    """Named sizes have the published parameter counts (within 1 %)."""
    from flexgen.models.registry import args_from_name
    expected = {"llama-2-7b": 6.74e9, "llama-2-70b": 68.98e9, "llama-3-8b": 8.03e9, "llama-3.1-70b": 70.55e9,
                "llama-3.1-405b": 405.85e9, "mistral-7b": 7.24e9, "qwen2.5-7b": 7.62e9, "qwen2.5-72b": 72.71e9,
                "qwen2.5-0.5b": 0.494e9}
    for name, n in expected.items():
        got = args_from_name(name).num_parameters()
        assert abs(got - n) / n < 0.01, (name, got, n)
    with pytest.raises(FlexGenError, match="unknown model"):
        args_from_name("llama-5-1t")


def test_dummy_weights_are_sane(offload):
    """Dummy norm weights are one (not zero): logits of a dummy model are finite and vary."""
    from flexgen.checkpoint import DummySource
    from flexgen.layout import model_layouts
    from flexgen.models.registry import args_from_name
    args = args_from_name("llama-3-8b")
    norms = [e for lay in model_layouts(args, torch.float32, False) for e in lay.spec.entries if "norm" in e.field]
    assert norms and all(e.init == "ones" for e in norms)
    assert torch.equal(DummySource(args).get(norms[0].name, norms[0].shape, norms[0].init), torch.ones(4096))


def test_qwen2_layer_sliding_window_refused():
    from flexgen.models.registry import args_from_config
    cfg = dict(TINY, model_type="qwen2", use_sliding_window=True, sliding_window=8)
    with pytest.raises(FlexGenError, match="use_sliding_window"):
        args_from_config(cfg, "x")


def test_mistral_window_matters(checkpoints, prompts, offload, monkeypatch):
    """Guards the sliding-window reference: attending over the whole cache differs."""
    from flexgen.models import llama
    path, model = checkpoints("mistral-window")
    ids, mask = prompts
    _, ref_logits = hf_reference(model, ids, mask)
    real = llama.self_attention
    monkeypatch.setattr(llama, "self_attention", lambda w, x, m, p, kv, a: real(w, x, m, p, kv, a.__class__(
        **{**a.__dict__, "sliding_window": 0})))
    import flexgen.models.mistral as mistral
    monkeypatch.setattr(mistral, "self_attention", llama.self_attention)
    _, logits = run(path, POLICIES["all-gpu"], ids, mask, offload)
    assert (logits - ref_logits).abs().max() > 1e-3


def test_every_config_eos_ends_a_row(tmp_path, prompts, offload):
    """Llama 3.1 instruct lists several EOS tokens in config.json: any of them ends a row."""
    ids, mask = prompts
    base = make_family_checkpoint(tmp_path / "a", "llama", seed=11, num_key_value_heads=2)
    first, _ = hf_reference(base, ids, mask)
    eos = [int(first[0, ids.shape[1]]), int(first[3, ids.shape[1] + 1])]   # row 0's 1st, row 3's 2nd token
    model = make_family_checkpoint(tmp_path / "b", "llama", seed=11, num_key_value_heads=2, eos_token_id=eos)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=GEN, do_sample=False, pad_token_id=1)
    with flexgen.load_model(str(tmp_path / "b"), POLICIES["all-gpu"], device="cpu", dtype=torch.float32,
                            offload_dir=offload) as m:
        assert m.args.eos_token_ids == tuple(eos)
        out = m.generate(ids, mask, max_new_tokens=GEN, pad_token_id=1)
    assert torch.equal(out, ref)


def test_registry_by_model_type_or_architectures():
    from flexgen.models import llama, mistral, opt, qwen2
    from flexgen.models.registry import args_from_config, family_of
    for model_type, mod in (("llama", llama), ("mistral", mistral), ("qwen2", qwen2)):
        args = args_from_config(dict(TINY, model_type=model_type), "x")
        assert family_of(args) is mod and args.kv_width == 64
    arch = args_from_config(dict(TINY, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"]), "x")
    assert family_of(arch) is qwen2 and arch.kv_width == 32 and arch.qkv_bias
    assert family_of(args_from_config(dict(model_type="opt", hidden_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, ffn_dim=128), "x")) is opt
    with pytest.raises(FlexGenError, match="model_type 'gpt2'.*not supported"):
        args_from_config(dict(TINY, model_type="gpt2"), "x")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_matches_plain_softmax(dtype, groups, masked):
    """The shared attention (time-major cache, GQA stacking, the CPU single-query path)
    against softmax(q k^T) v in float64, at decode (one query) and prefill."""
    from flexgen.models.base import attend

    g = torch.Generator().manual_seed(0)
    r, nh, d, t = 3, 8, 16, 11
    nkv = nh // groups
    for s in (1, 5):
        q = torch.randn(r, s, nh * d, generator=g)
        k, v = torch.randn(t, r, nkv * d, generator=g), torch.randn(t, r, nkv * d, generator=g)
        mask = torch.ones(r, s, t, dtype=torch.bool).tril(t - s)
        if masked:
            mask[0, :, :4] = False   # a left-padded row
        out = attend(q.to(dtype), k.to(dtype), v.to(dtype), mask if masked or s > 1 else None, nh, nkv, scale=0.25)
        qh = q.double().view(r, s, nh, d).transpose(1, 2)
        kh = k.double().view(t, r, nkv, d).permute(1, 2, 0, 3).repeat_interleave(groups, 1)
        vh = v.double().view(t, r, nkv, d).permute(1, 2, 0, 3).repeat_interleave(groups, 1)
        scores = (qh @ kh.transpose(-1, -2) * 0.25).masked_fill(~mask[:, None], float("-inf"))
        ref = (scores.softmax(-1) @ vh).transpose(1, 2).reshape(r, s, nh * d)
        tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
        assert out.shape == ref.shape
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
