"""OPT config variants transformers honours: a non-affine final LayerNorm, an untied LM head."""

from __future__ import annotations

import torch

from conftest import make_checkpoint
from test_engine import P, hf_reference, run


def _check(path, model, prompts, offload, policy):
    ids, mask = prompts
    ref_seq, ref_logits = hf_reference(model, ids, mask)
    seq, logits = run(path, policy, ids, mask, offload)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_non_affine_layer_norm_keeps_final_norm(tmp_path, prompts, offload):
    """transformers applies a final LayerNorm without weights; skipping it moved logits by 0.35."""
    model = make_checkpoint(tmp_path / "ckpt", layer_norm_elementwise_affine=False, tokenizer=False, seed=4)
    _check(tmp_path / "ckpt", model, prompts, offload, P(50, 25, 50, 25))


def test_untied_lm_head_is_loaded(tmp_path, prompts, offload):
    """With tie_word_embeddings=False the checkpoint's own lm_head.weight is the head."""
    model = make_checkpoint(tmp_path / "ckpt", tie_word_embeddings=False, tokenizer=False, seed=5)
    assert not torch.equal(model.lm_head.weight, model.model.decoder.embed_tokens.weight)
    _check(tmp_path / "ckpt", model, prompts, offload, P(0, 50, 0, 50))
