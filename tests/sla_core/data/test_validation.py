"""Validation policies on each bad-row kind, reports with line numbers, and all-or-nothing writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sla_core.data import DataValidationError, TaskSpec, prepare_task
from tests.sla_core.data.helpers import write_csv

# (line in the file, kind, column) for each bad row written by `_bad_train_file`.
EXPECTED = [
    (4, "empty_text", "text"),
    (5, "missing_label", "label"),
    (6, "unknown_label", "label"),
    (7, "undecodable", "text"),
    (10, "malformed", "text"),
]


def _bad_train_file(path: Path, rows: list[dict[str, str]]) -> Path:
    """Real reviews, one on two lines, and one row of each bad kind at known lines (1 is the header)."""
    good = [f'"{r["text"]}",{r["label"]}\n' for r in rows]  # rows without quotes
    lines = [
        "text,label\n",
        good[0],
        good[1],
        '"   ",fresh\n',  # 4: whitespace text
        f'"{rows[2]["text"]}",\n',  # 5: no label
        f'"{rows[3]["text"]}",lukewarm\n',  # 6: not a declared label
        None,  # 7: a byte that is not UTF-8
        '"a review over\ntwo lines",rotten\n',  # 8-9: fine, one record on two lines
        f'"{rows[4]["text"]}",fresh,extra\n',  # 10: too many fields
        *good[5:],
    ]
    with open(path, "wb") as f:
        for line in lines:
            f.write(b'"caf\xe9 and popcorn",fresh\n' if line is None else line.encode("utf-8"))
    return path


def _spec(train: Path, **kw: Any) -> TaskSpec:
    return TaskSpec(name="rt_bad", files={"train": train}, labels=["rotten", "fresh"], **kw)


@pytest.fixture
def bad_file(tmp_path: Path, rt_rows: list) -> Path:
    return _bad_train_file(tmp_path / "train.csv", [r for r in rt_rows[:40] if '"' not in r["text"]][:40])


def test_error_policy_reports_each_kind_with_line_and_column(
    bad_file: Path, tokenizer: Any, tmp_path: Path
) -> None:
    with pytest.raises(DataValidationError) as info:
        prepare_task(_spec(bad_file), tokenizer, tmp_path / "cache", progress=False)
    report = info.value.report
    assert {k: n for k, n in report.counts.items() if n} == {kind: 1 for _, kind, _ in EXPECTED}
    assert [(e.line, e.kind, e.column) for e in report.examples] == EXPECTED
    message = str(info.value)
    assert "train.csv line 7, column 'text': undecodable" in message
    assert "fix: re-save the file as UTF-8 or set `files.encoding:`" in message
    assert "Nothing was written" in message and "policy: skip" in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_skip_policy_drops_bad_rows_and_records_them(bad_file: Path, tokenizer: Any, tmp_path: Path) -> None:
    spec = _spec(bad_file, validation={"policy": "skip", "max_skip_fraction": 0.2})
    ref = prepare_task(spec, tokenizer, tmp_path / "cache", progress=False)
    assert ref.skipped == {kind: 1 for _, kind, _ in EXPECTED}
    texts = {t for s in ref.splits for t in ref.load(s)["text"]}
    assert len(texts) == sum(ref.counts.values()) == 43 - len(EXPECTED)
    assert "a review over\ntwo lines" in texts and not any(not t.strip() for t in texts)
    report = (Path(ref.path) / "report.json").read_text()
    assert '"unknown_label": 1' in report


def test_skip_policy_fails_above_max_fraction(bad_file: Path, tokenizer: Any, tmp_path: Path) -> None:
    spec = _spec(bad_file, validation={"policy": "skip", "max_skip_fraction": 0.05})
    with pytest.raises(DataValidationError, match=r"5 of 43 rows are bad \(11\.6%\), policy skip"):
        prepare_task(spec, tokenizer, tmp_path / "cache", progress=False)


def test_wrong_encoding_can_be_declared(tmp_path: Path, tokenizer: Any, rt_rows: list) -> None:
    rows = [{"text": r["text"], "label": r["label"]} for r in rt_rows[:30]]
    rows[0]["text"] = "caf\u00e9 and popcorn"
    path = tmp_path / "latin.csv"
    path.write_bytes(
        write_csv(tmp_path / "u.csv", rows, ["text", "label"]).read_text().encode("latin-1", "replace")
    )
    with pytest.raises(DataValidationError, match="undecodable"):
        prepare_task(_spec(path), tokenizer, tmp_path / "c", progress=False)
    spec = TaskSpec(name="rt_latin", files={"train": path, "encoding": "latin-1"})
    ref = prepare_task(spec, tokenizer, tmp_path / "c", progress=False)
    assert "caf\u00e9 and popcorn" in {t for s in ref.splits for t in ref.load(s)["text"]}


def test_duplicates_across_splits(tmp_path: Path, tokenizer: Any, rt_rows: list) -> None:
    rows = [{"text": r["text"], "label": r["label"]} for r in rt_rows[:60]]
    leaked = {"text": "  " + rows[3]["text"].upper() + " ", "label": rows[3]["label"]}  # same text, re-cased
    files = {
        "train": write_csv(tmp_path / "train.csv", rows[:40], ["text", "label"]),
        "validation": write_csv(tmp_path / "val.csv", rows[40:50] + [leaked], ["text", "label"]),
        "test": write_csv(tmp_path / "test.csv", rows[50:60] + [rows[45]], ["text", "label"]),
    }
    with pytest.raises(DataValidationError) as info:
        prepare_task(TaskSpec(name="dup", files=files), tokenizer, tmp_path / "c", progress=False)
    report = info.value.report
    assert report.counts["duplicate_across_splits"] == 2
    # test.csv: the header, 10 records of which one (row 54) spans two lines, then the copy on line 13
    assert "\n" in rows[54]["text"]
    assert [(e.split, e.line) for e in report.examples] == [("validation", 12), ("test", 13)]
    spec = TaskSpec(name="dup", files=files, validation={"policy": "skip", "max_skip_fraction": 0.05})
    ref = prepare_task(spec, tokenizer, tmp_path / "c", progress=False)
    assert ref.counts == {"train": 40, "validation": 10, "test": 10}


def test_failed_prepare_leaves_previous_cache_untouched(
    tmp_path: Path, tokenizer: Any, rt_rows: list
) -> None:
    rows = [{"text": r["text"], "label": r["label"]} for r in rt_rows[:40]]
    path = write_csv(tmp_path / "train.csv", rows, ["text", "label"])
    cache = tmp_path / "cache"
    ref = prepare_task(_spec(path), tokenizer, cache, progress=False)
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    rows[7]["label"] = "meh"
    write_csv(path, rows, ["text", "label"])
    with pytest.raises(DataValidationError, match="line 9, column 'label': unknown_label"):
        prepare_task(_spec(path), tokenizer, cache, progress=False)
    after = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    assert after == before and [p.name for p in cache.iterdir()] == [Path(ref.path).name]
