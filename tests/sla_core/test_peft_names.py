"""PEFT's names on `SLAModel`: from_pretrained(dir) loads the named backbone; print_trainable_parameters."""

from __future__ import annotations

import pytest
import torch

from sla_core import AdapterFileError, SLAConfig, SLAModel, attach
from sla_core.backbones import load_backbone
from tests.sla_core.test_model import _train
from tests.sla_core.tiny import batch, tiny_backbone


def _logits(model):
    ids, mask = batch()
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask).logits


def test_from_pretrained_loads_the_backbone_named_in_the_set(tmp_path):
    tiny_backbone("bert").save_pretrained(tmp_path / "backbone")  # a local backbone folder, named by path
    model = _train(attach(load_backbone(str(tmp_path / "backbone")), SLAConfig(tasks={"a": 2}, rank=4)), 3)
    model.save_pretrained(tmp_path / "set")
    again = SLAModel.from_pretrained(str(tmp_path / "set"))
    assert isinstance(again, SLAModel) and again.backbone_name == str(tmp_path / "backbone")
    assert torch.equal(_logits(model), _logits(again))
    given = SLAModel.from_pretrained(str(tmp_path / "set"), backbone=tiny_backbone("bert"))
    assert torch.equal(_logits(model), _logits(given))  # same seed, same weights


def test_from_pretrained_without_a_backbone_name_says_pass_one(tmp_path):
    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4))
    model.backbone_name = ""
    model.save_pretrained(tmp_path / "set")
    with pytest.raises(AdapterFileError, match="pass backbone="):
        SLAModel.from_pretrained(str(tmp_path / "set"))


def test_print_trainable_parameters_names_its_denominator(capsys):
    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4))
    model.print_trainable_parameters()
    counts = model.parameter_counts()
    line = capsys.readouterr().out.strip()
    assert line == (
        f"trainable params: {counts['trainable']:,} || all params: "
        f"{counts['trainable'] + counts['backbone']:,} || trainable%: {model.trainable_percent():.4f} "
        f"(of the backbone's {counts['backbone']:,} parameters)"
    )
