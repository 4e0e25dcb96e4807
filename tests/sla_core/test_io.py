"""Saving and loading adapter sets: round trips, and refusal of foreign or tampered files."""

from __future__ import annotations

import json

import pytest
import torch

from sla_core import AdapterFileError, SLAConfig, attach, load_adapters
from sla_core.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from tests.sla_core.test_model import _train
from tests.sla_core.tiny import batch, tiny_backbone


@pytest.fixture
def saved(tmp_path):
    model = _train(
        attach(tiny_backbone("llama"), SLAConfig(tasks={"a": 2, "b": 3}, rank=4, pool_size=2)),
        task_ids=torch.tensor([0, 1, 0, 1]),
        labels=torch.tensor([1, 2, 0, 1]),
        steps=10,
    )
    with torch.no_grad():
        model.sla_gates.log_alpha[0, :2] = -10.0
    pruned = model.prune()
    path = tmp_path / "set"
    pruned.save_adapters(path)
    return pruned, path


def _logits(model, task_ids=torch.tensor([0, 1, 1, 0])):
    ids, mask = batch()
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits


def test_save_then_load_into_fresh_backbone_reproduces_logits(saved):
    pruned, path = saved
    files = sorted(p.name for p in path.iterdir())
    assert files == ["sla_adapter_config.json", "sla_adapter_model.safetensors"]
    meta = json.loads((path / "sla_adapter_config.json").read_text())
    assert meta["format_version"] == 1 and meta["pruned"] and meta["backbone"]["model_type"] == "llama"
    again = load_adapters(tiny_backbone("llama"), path)
    assert torch.equal(_logits(pruned), _logits(again))


def test_unpruned_round_trip(tmp_path):
    model = _train(attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4)), steps=3)
    model.save_adapters(tmp_path / "raw")
    again = load_adapters(tiny_backbone("bert"), tmp_path / "raw")
    assert again.sla_gates is not None
    assert torch.equal(_logits(model, None), _logits(again, None))


def test_tampered_weights_are_refused(saved):
    _, path = saved
    weights = path / "sla_adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="do not match the sha256"):
        load_adapters(tiny_backbone("llama"), path)


def test_other_backbone_is_refused(saved):
    _, path = saved
    with pytest.raises(AdapterFileError, match="differs from this one|does not exist"):
        load_adapters(tiny_backbone("bert"), path)


def test_foreign_peft_adapter_is_refused(tmp_path):
    (tmp_path / "sla_adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(AdapterFileError, match="looks like a PEFT adapter"):
        load_adapters(tiny_backbone("bert"), tmp_path)


def test_own_file_names_beside_peft_ones(saved, tmp_path):
    """Not PEFT's names; PEFT's folder and an old-named set say what to do."""
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert CONFIG_NAME != "adapter_config.json" and WEIGHTS_NAME != "adapter_model.safetensors"
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="adapter_config.json"):  # PEFT finds no file of its own
        peft.PeftConfig.from_pretrained(str(path))

    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(AdapterFileError, match=r"this is a PEFT adapter.*load it with peft"):
        read_adapter_config(peft_dir)

    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_config.json").write_text((path / CONFIG_NAME).read_text())
    (old / "adapter_model.safetensors").write_bytes((path / WEIGHTS_NAME).read_bytes())
    with pytest.raises(AdapterFileError, match=f"older sla; rename adapter_config.json to {CONFIG_NAME}"):
        read_adapter_config(old)
    (old / "adapter_config.json").rename(old / CONFIG_NAME)
    (old / "adapter_model.safetensors").rename(old / WEIGHTS_NAME)
    assert load_adapters(tiny_backbone("llama"), old).pruned


def test_other_version_and_missing_files_are_refused(saved, tmp_path):
    _, path = saved
    meta = json.loads((path / "sla_adapter_config.json").read_text())
    meta["format_version"] = 99
    (path / "sla_adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="format_version 99"):
        load_adapters(tiny_backbone("llama"), path)
    with pytest.raises(AdapterFileError, match="not found"):
        load_adapters(tiny_backbone("llama"), tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sla_adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        load_adapters(tiny_backbone("llama"), tmp_path / "bad")


def test_mis_shaped_tensor_is_refused(saved):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sla_core.files import sha256_file

    _, path = saved
    weights = path / "sla_adapter_model.safetensors"
    state = load_file(str(weights))
    with safe_open(str(weights), framework="pt") as f:
        header = f.metadata()  # kept: it seals the description, which this test leaves alone
    key = next(k for k in state if k.endswith("down_weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(weights), metadata=header)
    meta = json.loads((path / "sla_adapter_config.json").read_text())
    meta["sha256"] = sha256_file(weights)  # a consistent but wrong file
    (path / "sla_adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="has shape"):
        load_adapters(tiny_backbone("llama"), path)


def test_saving_over_an_existing_set_replaces_it_whole(saved):
    pruned, path = saved
    pruned.save_adapters(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["set"]
    load_adapters(tiny_backbone("llama"), path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["sla_config"].update(activation="tanh"),
        lambda m: m["sla_config"].update(pooling="mean"),
        lambda m: m["sites"].pop(),
        lambda m: m.update(pruned=not m["pruned"]),
        lambda m: m["backbone"].update(name_or_path="other"),
    ],
    ids=["activation", "pooling", "sites", "structure", "backbone"],
)
def test_a_changed_description_is_refused(saved, edit):
    """relu -> tanh in sla_adapter_config.json is refused: it would load and move the logits."""
    _, path = saved
    meta = json.loads((path / "sla_adapter_config.json").read_text())
    edit(meta)
    (path / "sla_adapter_config.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(AdapterFileError, match="the description differs from the one saved with the weights"):
        load_adapters(tiny_backbone("llama"), path)


def test_a_description_without_sites_is_named(saved):
    """A description lacking `sites` is named, not a KeyError."""
    _, path = saved
    meta = json.loads((path / "sla_adapter_config.json").read_text())
    del meta["sites"]
    (path / "sla_adapter_config.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: lacks `sites`"):
        load_adapters(tiny_backbone("llama"), path)
    from sla_core.methods import load_trained  # what `sla evaluate` calls

    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: lacks `sites`"):
        load_trained(tiny_backbone("llama"), path)
