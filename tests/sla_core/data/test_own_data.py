"""Issue 16, item 3: a user's own CSV files, with or without a header row, a BOM, and `--set` on a task."""

from __future__ import annotations

from pathlib import Path

import pytest

from sla_core.data import DataSourceError, TaskSpec
from sla_core.data.readers import read_local
from sla_core.experiment import load_experiment, parse_overrides

ROOT = Path(__file__).resolve().parents[3]
REVIEW = "a gorgeous, witty, seductive movie that never loses its nerve"


def _spec(path: Path, **files) -> TaskSpec:
    return TaskSpec(name="mine", files={"train": path, **files}, labels=["neg", "pos"])


def test_a_headerless_csv_reads_with_columns_and_its_error_names_the_fix(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(f'pos,"{REVIEW}"\nneg,"dull, flat and long"\n', encoding="utf-8")
    with pytest.raises(DataSourceError) as err:
        read_local(_spec(path))
    message = str(err.value)
    assert "reads as data, not column names" in message and "`columns: [label, text]`" in message
    assert REVIEW not in message  # a long field is shortened, not printed whole as a column name

    for files in ({"columns": ["label", "text"]}, {"header": False, "columns": ["label", "text"]}):
        raw = read_local(_spec(path, **files))["train"]
        assert raw.label == ["pos", "neg"] and raw.text == [REVIEW, "dull, flat and long"]
        assert raw.line == [1, 2]

    with pytest.raises(ValueError, match=r"`header: false` needs `columns:`.*columns: \[label, text\]"):
        _spec(path, header=False)
    with pytest.raises(DataSourceError, match=r"line 1: 2 fields, but `columns:` .* names 3"):
        read_local(_spec(path, columns=["label", "text", "extra"]))


def test_a_bom_before_a_quoted_header(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes('\ufeff"label","text"\npos,"fine"\n'.encode())
    raw = read_local(_spec(path))["train"]
    assert raw.label == ["pos"] and raw.text == ["fine"]


def test_set_reaches_a_task_path_and_its_header_options(tmp_path):
    path = tmp_path / "other.csv"
    cfg = load_experiment(
        ROOT / "configs" / "tiny.yaml",
        parse_overrides(
            [
                "tasks.0.source=local",
                "tasks.0.builtin=null",
                "tasks.0.labels=[neg, pos]",
                f"tasks.0.files.train={path}",
                "tasks.0.files.columns=[label, text]",
                "tasks.0.max_length=64",
            ]
        ),
    )
    task = cfg.tasks[0]
    assert task.files.train == path and task.files.columns == ["label", "text"] and task.max_length == 64
