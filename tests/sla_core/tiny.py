"""Tiny backbones built from configs (random init, seeded) for fast structural tests."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM

VOCAB = 100


def tiny_backbone(kind: str, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=VOCAB
        )
        return BertModel(cfg).eval()
    if kind == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
        return GPT2Model(cfg).eval()
    if kind == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=37,
            vocab_size=VOCAB,
            pad_token_id=0,
        )
        return LlamaForCausalLM(cfg).eval()
    raise ValueError(kind)


def batch(n: int = 4, length: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 3 :] = 0  # one padded row
    return ids, mask
