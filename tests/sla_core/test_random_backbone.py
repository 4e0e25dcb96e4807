"""`random-llama:<size>` backbones: Llama decoders built from a config with seeded weights, no download."""

from __future__ import annotations

import pytest
import torch

from sla_core import SLAConfig, attach
from sla_core.backbones import load_backbone, load_tokenizer, random_llama_config, resolve_backbone


def test_unknown_size_names_the_sizes_there_are():
    with pytest.raises(
        ValueError,
        match=r"unknown size '7b'; use one of \['random-llama:tiny', 'random-llama:1.1b', 'random-llama:3b'",
    ):
        resolve_backbone("random-llama:7b")


def test_the_same_name_gives_the_same_weights_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = load_backbone("random-llama:tiny"), load_backbone("random-llama:tiny")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.config.name_or_path == "random-llama:tiny" and a.config.pad_token_id == 2
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    norm = a.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    q = a.model.layers[0].self_attn.q_proj.weight
    assert 0.015 < float(q.std()) < 0.025  # N(0, initializer_range = 0.02)


def test_smollm2_s_tokenizer_fits_the_vocabulary():
    tok = load_tokenizer("random-llama:tiny")
    config = random_llama_config("tiny")
    assert len(tok) <= config.vocab_size and tok.eos_token_id == config.eos_token_id
    assert tok.name_or_path == "random-llama:tiny"


@pytest.mark.parametrize(("size", "parameters"), [("1.1b", 1_069_639_680), ("3b", 2_969_742_336)])
def test_the_large_sizes_have_their_parameter_counts(size, parameters):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(random_llama_config(size))
    assert sum(p.numel() for p in model.model.parameters()) == parameters


def test_gated_adapters_attach_and_train_a_step():
    model = attach(load_backbone("random-llama:tiny"), SLAConfig(tasks={"t": 3}, rank=4)).train()
    ids = torch.randint(3, 1000, (2, 7))  # (B, T)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    assert model.sla_heads["t"].weight.grad is not None
