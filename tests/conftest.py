"""Small random OPT checkpoints (transformers) and a locally trained tokenizer."""

from __future__ import annotations

import pytest
import torch

VOCAB = 320


def _train_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["Paris is the capital city of France. " * 3, "The quick brown fox jumps over the lazy dog. " * 3,
            "def generate(model, prompt): return model(prompt)"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")
    fast.save_pretrained(directory)
    return fast


def make_checkpoint(directory, *, post_ln=False, seed=0, safe=True, shard=None, layers=2, tokenizer=True,
                    **overrides):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    kw = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, ffn_dim=128, vocab_size=VOCAB,
              max_position_embeddings=96, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if post_ln:  # the opt-350m shape: post-LayerNorm, project_in/out, no final norm
        kw.update(do_layer_norm_before=False, word_embed_proj_dim=32)
    kw.update(overrides)
    model = OPTForCausalLM(OPTConfig(**kw)).eval()
    with torch.no_grad():  # random init leaves norms at 1/0 and biases at 0; make them matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    extra = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, **extra)
    if not safe:
        _to_sharded_bin(directory, model)
    if tokenizer:
        _train_tokenizer(directory)
    return model


def _to_sharded_bin(directory, model):
    """transformers 5 writes only safetensors; write the legacy sharded .bin layout by hand."""
    import json
    from pathlib import Path

    d = Path(directory)
    for f in list(d.glob("model*.safetensors*")):
        f.unlink()
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for n, names in enumerate(shards):
        fname = f"pytorch_model-{n + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in names}, d / fname)
        weight_map.update({k: fname for k in names})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt-tiny")
    model = make_checkpoint(d)
    return d, model


@pytest.fixture(scope="session")
def opt350_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt-tiny-postln")
    model = make_checkpoint(d, post_ln=True, seed=1, tokenizer=False)
    return d, model


@pytest.fixture(scope="session")
def prompts():
    """Left-padded prompts of unequal length: 5 rows, so blocks of 2 or 4 do not divide them."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 1, 5, 0]):
        ids[row, :pad] = 1
        mask[row, :pad] = 0
    return ids, mask


@pytest.fixture
def offload(tmp_path):
    return tmp_path / "offload"
