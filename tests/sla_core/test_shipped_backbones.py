"""The method on the real shipped backbones: MiniLM (BERT encoder) and SmolLM2-135M (Llama decoder)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sla_core import SLAConfig, attach, load_adapters
from sla_core.backbones import load_backbone

TEXTS = [
    "a gripping, beautifully acted film",
    "dull and far too long.",
    "the cast is fine but the script is not",
]


def _smollm2(smollm2_state):
    config, state = smollm2_state
    config = config.__class__.from_dict(
        {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    )
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state)
    model.config.name_or_path = "smollm2"
    return model.eval()


def _check_backbone(fresh, tokenizer, tmp_path):
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    plain = fresh()
    with torch.no_grad():
        hidden_before = plain.base_model(**enc).last_hidden_state
    model = attach(plain, SLAConfig(tasks={"s": 2, "t": 3}, rank=8, pool_size=2, seed=3))
    seen = []
    model.backbone.register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state))
    task_ids = torch.tensor([0, 1, 0])
    with torch.no_grad():
        model.eval()(**enc, task_ids=task_ids)
    assert torch.equal(hidden_before, seen[0])  # a no-op at init

    opt = torch.optim.AdamW(model.parameter_groups(1e-2, 0.2))
    model.train()
    for _ in range(3):
        model(**enc, labels=torch.tensor([1, 2, 0]), task_ids=task_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        model.sla_gates.log_alpha[:, ::3] = -10.0  # closed for every task: removed
        model.sla_gates.log_alpha[0, 1::3] = -10.0  # closed for one task: kept for the other
        before = model(**enc, task_ids=task_ids).logits
    pruned = model.prune()
    with torch.no_grad():
        after = pruned(**enc, task_ids=task_ids).logits
    assert torch.allclose(before, after, atol=1e-4)
    pruned.save_adapters(tmp_path / "set")
    again = load_adapters(fresh(), tmp_path / "set")
    with torch.no_grad():
        assert torch.allclose(again(**enc, task_ids=task_ids).logits, after, atol=1e-5)
    return model, pruned


def test_minilm(minilm_tokenizer, tmp_path):
    model, pruned = _check_backbone(lambda: load_backbone("minilm"), minilm_tokenizer, tmp_path)
    assert len(model.sites) == 12 and model.pooling == "mean"
    assert model.backbone_name == "minilm"
    assert 0.5 < model.trainable_percent() < 5.0
    assert pruned.parameter_counts()["adapters"] < model.parameter_counts()["adapters"]


@pytest.mark.slow
def test_smollm2(smollm2_state, smollm2_tokenizer, tmp_path):
    model, _ = _check_backbone(lambda: _smollm2(smollm2_state), smollm2_tokenizer, tmp_path)
    assert len(model.sites) == 60 and model.pooling == "last"
