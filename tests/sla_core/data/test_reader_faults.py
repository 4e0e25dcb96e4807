"""The readers refuse malformed sources: open quotes, huge cells, mixed labels, repeated columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sla_core.data import DataSourceError, TaskSpec, prepare_task
from tests.sla_core.data.helpers import write_csv


def _rows(rt_rows: list, n: int) -> list[dict[str, str]]:
    """Real reviews that the csv writer leaves unquoted: one physical line each."""
    plain = [r for r in rt_rows if not set(r["text"]) & {'"', "\n", "\r", ","}]
    return [{"text": r["text"], "label": r["label"]} for r in plain[:n]]


def _skip_spec(path: Path, name: str = "faults") -> TaskSpec:
    return TaskSpec(
        name=name, files={"train": path}, validation={"policy": "skip", "max_skip_fraction": 0.05}
    )


def test_an_unclosed_quote_is_refused_at_its_line_not_skipped(
    tmp_path: Path, tokenizer: Any, rt_rows: list
) -> None:
    rows = _rows(rt_rows, 100)
    path = write_csv(tmp_path / "train.csv", rows, ["text", "label"])
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 101  # a header and 100 one-line records
    lines[51] = '"' + lines[51]  # row 51 (line 52) opens a quote that never closes
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"train\.csv line 52: a quoted field opens here") as info:
        prepare_task(_skip_spec(path), tokenizer, tmp_path / "cache", progress=False)
    assert "lines 52-101, 50 physical lines" in str(info.value) and '("")' in str(info.value)


def test_an_open_quote_closed_by_a_later_quote_is_refused(
    tmp_path: Path, tokenizer: Any, rt_rows: list
) -> None:
    rows = _rows(rt_rows, 60)
    rows[40]["text"] = '"' + rows[40]["text"]  # the writer escapes it: a well-formed record
    rows[50]["text"] = "quoted"  # written bare; the stray quote below closes on the next quoted text
    path = write_csv(tmp_path / "train.csv", rows, ["text", "label"])
    raw = path.read_text(encoding="utf-8").replace("\nquoted,", '\n"quoted",').splitlines(keepends=True)
    raw[21] = '"' + raw[21]
    path.write_text("".join(raw), encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"line 22: a quoted field opens here.*lines 22-42"):
        prepare_task(_skip_spec(path), tokenizer, tmp_path / "cache", progress=False)


def test_a_well_formed_multiline_field_is_kept(tmp_path: Path, tokenizer: Any, rt_rows: list) -> None:
    rows = _rows(rt_rows, 40)
    rows[5]["text"] = 'a review over\ntwo lines, with a "quote"'
    path = write_csv(tmp_path / "train.csv", rows, ["text", "label"])
    ref = prepare_task(_skip_spec(path), tokenizer, tmp_path / "cache", progress=False)
    assert sum(ref.counts.values()) == 40 and not ref.skipped


def test_a_cell_over_128_kib_is_read(tmp_path: Path, tokenizer: Any, rt_rows: list) -> None:
    rows = _rows(rt_rows, 40)
    rows[3]["text"] = "long " * 40_000  # 200 KB, over Python's default csv field limit of 128 Ki
    path = write_csv(tmp_path / "train.csv", rows, ["text", "label"])
    ref = prepare_task(_skip_spec(path), tokenizer, tmp_path / "cache", progress=False)
    assert sum(ref.counts.values()) == 40


def test_a_cell_over_the_raised_limit_names_its_line(tmp_path: Path, tokenizer: Any, rt_rows: list) -> None:
    from sla_core.data import readers

    rows = _rows(rt_rows, 40)
    rows[3]["text"] = "x" * (readers.FIELD_SIZE_LIMIT + 1)
    path = write_csv(tmp_path / "train.csv", rows, ["text", "label"])
    with pytest.raises(DataSourceError, match=r"train\.csv line 5: a field is longer than \d+ characters"):
        prepare_task(_skip_spec(path), tokenizer, tmp_path / "cache", progress=False)


@pytest.mark.parametrize("declared", [True, False])
def test_mixed_integer_and_name_labels_are_refused(
    declared: bool, tmp_path: Path, tokenizer: Any, rt_rows: list
) -> None:
    rows = _rows(rt_rows, 40)
    rows[7]["label"] = "0"  # line 9: an index among names
    path = write_csv(tmp_path / "train.csv", rows, ["text", "label"])
    labels = {"labels": ["rotten", "fresh"]} if declared else {}
    spec = TaskSpec(name="mixed", files={"train": path}, **labels)
    with pytest.raises(DataSourceError, match=r"train\.csv line 9: label '0' is a number, but .* line 2 has"):
        prepare_task(spec, tokenizer, tmp_path / "cache", progress=False)


def test_integer_labels_alone_or_declared_as_names_are_accepted(
    tmp_path: Path, tokenizer: Any, rt_rows: list
) -> None:
    rows = [{"text": r["text"], "label": str(i % 2)} for i, r in enumerate(_rows(rt_rows, 40))]
    path = write_csv(tmp_path / "train.csv", rows, ["text", "label"])
    spec = TaskSpec(name="ints", files={"train": path})
    ref = prepare_task(spec, tokenizer, tmp_path / "c", progress=False)
    assert ref.labels == ["0", "1"]
    rows[0]["label"] = "other"
    write_csv(path, rows, ["text", "label"])
    spec = TaskSpec(name="named", files={"train": path}, labels=["0", "1", "other"])
    assert prepare_task(spec, tokenizer, tmp_path / "c", progress=False).labels == ["0", "1", "other"]


def test_repeated_column_names_are_refused(tmp_path: Path, tokenizer: Any, rt_rows: list) -> None:
    rows = _rows(rt_rows, 40)
    path = tmp_path / "train.csv"
    body = "".join(f"{r['text']},{r['label']},other\n" for r in rows)
    path.write_text("text,label,text\n" + body)
    with pytest.raises(DataSourceError, match=r"train\.csv: the header repeats the column name\(s\) \["):
        prepare_task(_skip_spec(path), tokenizer, tmp_path / "cache", progress=False)


def test_repeated_parquet_columns_are_refused(tmp_path: Path, tokenizer: Any, rt_rows: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(rt_rows, 40)
    table = pa.Table.from_arrays(
        [pa.array([r["text"] for r in rows]), pa.array([r["label"] for r in rows]), pa.array(["x"] * 40)],
        names=["text", "label", "label"],
    )
    pq.write_table(table, tmp_path / "train.parquet")
    with pytest.raises(DataSourceError, match=r"repeated column name\(s\) \['label'\]"):
        prepare_task(_skip_spec(tmp_path / "train.parquet"), tokenizer, tmp_path / "cache", progress=False)


def test_a_directory_is_reported_as_a_directory(tmp_path: Path, tokenizer: Any) -> None:
    (tmp_path / "train.csv").mkdir()
    with pytest.raises(DataSourceError, match=r"train\.csv: is a directory, not a data file"):
        prepare_task(_skip_spec(tmp_path / "train.csv"), tokenizer, tmp_path / "cache", progress=False)
