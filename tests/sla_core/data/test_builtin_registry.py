"""A builtin task is one record in `BUILTIN`: a record added here is resolvable everywhere a builtin is."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from sla_core.data import TaskSpec, builtin, prepare_task
from sla_core.data.builtin import BuiltinTask, builtin_names, builtin_task, load_builtin
from sla_core.data.errors import DataSourceError
from sla_core.data.raw import RawSplit


def read_toy(path: Path, progress: bool = False) -> RawSplit:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return RawSplit(
        text=[r["text"] for r in rows],
        label=[r["label"] for r in rows],
        line=list(range(2, len(rows) + 2)),
        source=[path.name] * len(rows),
    )


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BuiltinTask:
    """A package `toy_sla_data` shipping 60 distinct rows and one duplicate, registered as builtin `toy`."""
    package = tmp_path / "site" / "toy_sla_data"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    lines = ["text,label"] + [
        f"toy review number {i} is {'good' if i % 2 else 'bad'},{i % 2}" for i in range(60)
    ]
    (package / "rows.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    record = BuiltinTask(
        name="toy",
        labels=("0", "1"),
        package="toy_sla_data",
        path="rows.csv",
        load=read_toy,
        abbreviation="ty",
        title="Toy",
    )
    monkeypatch.setattr(builtin, "BUILTIN", [*builtin.BUILTIN, record])
    return record


def test_a_new_record_is_a_builtin_task(toy: BuiltinTask) -> None:
    assert "toy" in builtin_names() and builtin_task("toy") is toy
    spec = TaskSpec(name="toy")
    assert spec.source == "builtin" and spec.declared_labels == ["0", "1"]
    with pytest.raises(ValueError, match="builtin 'toy' has labels"):
        TaskSpec(name="toy", labels=["a", "b"])
    raw, stats = load_builtin("toy")
    assert len(raw.text) == 60 and raw.group is not None and sum(stats.values()) >= 1


def test_the_experiment_knows_its_labels(toy: BuiltinTask) -> None:
    from sla_core.experiment import task_labels

    assert task_labels(TaskSpec(name="toy")) == ["0", "1"]


def test_a_new_record_prepares_like_the_shipped_ones(
    toy: BuiltinTask, tokenizer: Any, tmp_path: Path
) -> None:
    ref = prepare_task(TaskSpec(name="toy", max_length=16), tokenizer, tmp_path / "cache", progress=False)
    assert ref.labels == ["0", "1"] and sum(ref.counts.values()) == 60


def test_an_unknown_builtin_lists_the_registered_ones(toy: BuiltinTask) -> None:
    with pytest.raises(ValueError, match=r"unknown builtin task 'nope'.*'toy'"):
        TaskSpec(name="nope")
    with pytest.raises(DataSourceError, match=r"choose one of \[.*'toy'"):
        builtin_task("nope")
