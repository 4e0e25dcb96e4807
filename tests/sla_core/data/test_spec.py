"""TaskSpec/NoiseSpec validation and the YAML task loader: typos are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sla_core.data import ConfigError, NoiseSpec, TaskSpec, load_tasks_from_yaml


def test_builtin_defaults() -> None:
    spec = TaskSpec(name="bbc_news")
    assert spec.source == "builtin" and spec.builtin_name == "bbc_news"
    assert spec.declared_labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert spec.max_length == 128 and spec.validation.policy == "error" and spec.train_noise.is_zero
    assert spec.eval_noise_levels == [0.0, 0.05, 0.10, 0.15, 0.20]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "nope"}, "unknown builtin task 'nope'"),
        ({"name": "t", "source": "local"}, "source: local needs `files: {train"),
        ({"name": "t", "source": "hub"}, "source: hub needs `hub:"),
        ({"name": "tweets", "labels": ["a", "b"]}, "builtin 'tweets' has labels"),
        ({"name": "t", "files": {"train": "x.csv"}, "labels": ["a"]}, "at least two distinct"),
        ({"name": "t", "files": {"train": "x.csv"}, "split_fractions": [0.5, 0.1, 0.1]}, "sum to 1"),
        ({"name": "tweets", "eval_noise_levels": [0.1, 1.5]}, r"must lie in \[0, 1\]"),
        ({"name": "tweets", "max_lenght": 64}, "Extra inputs are not permitted"),
    ],
)
def test_bad_specs_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TaskSpec(**kwargs)


def test_noise_spec_bounds_and_typos() -> None:
    with pytest.raises(ValidationError):
        NoiseSpec(char=1.2)
    with pytest.raises(ValidationError, match="Extra inputs"):
        NoiseSpec(chars=0.1)  # type: ignore[call-arg]
    assert NoiseSpec(label=0.1).is_zero is False


def test_labels_may_be_integers_in_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        "backbone: minilm\n"
        "tasks:\n"
        "  - name: rotten_tomatoes\n"
        "    train_noise: {char: 0.05, label: 0.1, seed: 3}\n"
        "  - name: mine\n"
        "    files: {train: data/train.jsonl}\n"
        "    text_pair_column: hypothesis\n"
        "    labels: [0, 1, 2]\n"
        "    validation: {policy: skip, max_skip_fraction: 0.01}\n",
        encoding="utf-8",
    )
    backbone, specs = load_tasks_from_yaml(cfg)
    assert backbone == "minilm" and [s.name for s in specs] == ["rotten_tomatoes", "mine"]
    assert specs[0].train_noise == NoiseSpec(char=0.05, label=0.1, seed=3)
    assert specs[1].source == "local" and specs[1].labels == ["0", "1", "2"]
    assert specs[1].validation.policy == "skip"


def test_yaml_errors_name_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "tasks:\n  - name: tweets\n  - name: bbc_news\n    train_noise: {chr: 0.1}\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError, match=r"bad\.yaml: tasks\[1\]: train_noise\.chr: Extra inputs"):
        load_tasks_from_yaml(cfg)
    cfg.write_text("tasks:\n  - name: tweets\n  - name: tweets\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"task names must be unique, repeated: \['tweets'\]"):
        load_tasks_from_yaml(cfg)
    cfg.write_text("backbone: minilm\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="non-empty `tasks:` list"):
        load_tasks_from_yaml(cfg)
