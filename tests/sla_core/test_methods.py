"""Methods: specs parse and round-trip, every method builds, trains a step, counts and saves/loads exactly,
and a new method registers with one decorator (the docs/extending.md example)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from sla_core.methods import METHODS, load_trained, parse_method, register_method
from sla_core.methods.baselines import _Baseline, _spec
from tests.sla_core.tiny import batch, tiny_backbone

SPECS = ["sla", "sla:rank=4,lambda_sparse=0.5", "adapters:rank=4", "lora:r=4", "lora:r=2,targets=query+value",
         "prefix:tokens=5", "full_ft:lr=0.0001"]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS)
def test_every_method_trains_counts_and_round_trips(spec: str, tmp_path) -> None:
    method = parse_method(spec)
    assert parse_method(method.spec) == method and method.spec == spec
    model = method.build(tiny_backbone("bert"), {"a": 2, "b": 3})
    groups = [g for g in method.parameter_groups(model, _cfg()) if g["params"]]
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0, 2]),
                task_ids=torch.tensor([0, 0, 1, 1]))  # fmt: skip
    out.loss.backward()
    heads = [p for n, p in model.named_parameters() if "sla_heads" in n]
    assert groups and all(p.grad is not None for p in heads)  # (BERT's unused pooler gets none)
    counts = method.counts(model)
    assert 0 < counts["kept"] <= counts["trainable"] and counts["backbone"] == 34_346
    shipped = method.prune(model).eval()
    method.save(shipped, tmp_path / "set")
    again, loaded = load_trained(tiny_backbone("bert"), tmp_path / "set")
    assert again == method
    with torch.no_grad():
        want = shipped(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 0, 1, 1])).logits
        got = loaded(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 0, 1, 1])).logits
    assert torch.allclose(want, got, atol=1e-6)


def _cfg():
    from sla_core.experiment import ExperimentConfig

    return ExperimentConfig.model_validate({"tasks": [{"name": "rotten_tomatoes"}]})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "method 'nope' is unknown; choose one of"),
        ("lora:rank=4", r"unknown option\(s\) \['rank'\]; lora takes"),
        ("sla:rnk=3", "unknown keys \\['rnk'\\]"),
        ("lora:r=0", "the rank must be an integer >= 1"),
        ("lora:r", "is not KEY=VALUE"),
    ],
)
def test_bad_specs_name_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_method(spec)


def test_a_config_with_a_bad_method_fails_at_load(tmp_path) -> None:
    from sla_core.experiment import ExperimentConfig

    with pytest.raises(ValueError, match="lora:rank=4"):
        ExperimentConfig.model_validate({"tasks": [{"name": "rotten_tomatoes"}], "method": "lora:rank=4"})


def test_a_method_registers_with_one_decorator(monkeypatch) -> None:
    monkeypatch.setattr("sla_core.methods.METHODS", dict(METHODS))

    @register_method
    @dataclass
    class BitFit(_Baseline):
        name: ClassVar[str] = "bitfit"
        lr: float | None = None

        @property
        def spec(self) -> str:
            return _spec(self.name, lr=self.lr)

        def wrap(self, base: nn.Module) -> nn.Module:
            for name, p in base.named_parameters():
                p.requires_grad_(name.endswith(".bias"))
            return base

    method = parse_method("bitfit:lr=1e-3")
    model = method.build(tiny_backbone("bert"), {"a": 2})
    biases = sum(p.numel() for n, p in model.backbone.named_parameters() if n.endswith(".bias"))
    assert method.counts(model)["trainable"] == biases + 33 * 2  # plus the head
