"""Fingerprints, cache hits, byte-identical rebuilds, DatasetRef round trips."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest

from sla_core.data import DatasetRef, NoiseSpec, TaskSpec, prepare_task, task_fingerprint
from sla_core.data import prepare as prepare_module
from tests.sla_core.data.helpers import write_csv

SPEC = TaskSpec(
    name="tweets",
    max_train_examples=150,
    max_eval_examples=40,
    max_length=24,
    train_noise=NoiseSpec(char=0.05, word=0.05, label=0.1, seed=2),
)


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.name != "ref.json"
    }


def test_cold_rebuild_is_byte_identical(tokenizer: Any, tmp_path: Path) -> None:
    a = prepare_task(SPEC, tokenizer, tmp_path / "a", progress=False)
    b = prepare_task(SPEC, tokenizer, tmp_path / "b", progress=False)
    assert a.fingerprint == b.fingerprint and a.counts == b.counts and a.noise == b.noise
    assert _digests(Path(a.path)) == _digests(Path(b.path))
    assert set(_digests(Path(a.path))) == {"train.arrow", "validation.arrow", "test.arrow", "report.json"}
    assert DatasetRef.from_json(a.to_json().replace(str(tmp_path / "a"), str(tmp_path / "b"))) == b


def test_cache_hit_reads_nothing_and_rewrites_nothing(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = prepare_task(SPEC, tokenizer, tmp_path, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in Path(first.path).iterdir()}

    def no_reading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cache hit must not read the source")

    monkeypatch.setattr(prepare_module, "_load_raw", no_reading)
    second = prepare_task(SPEC, tokenizer, tmp_path, progress=False)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in Path(first.path).iterdir()} == mtimes
    assert [p.name for p in tmp_path.iterdir()] == [Path(first.path).name]  # no temp folders left


def test_fingerprint_depends_on_each_input(tokenizer: Any, tmp_path: Path, rt_rows: list) -> None:
    base = task_fingerprint(SPEC, tokenizer)
    assert task_fingerprint(SPEC, tokenizer) == base
    changed = [
        SPEC.model_copy(update={"split_seed": 1}),
        SPEC.model_copy(update={"max_length": 32}),
        SPEC.model_copy(update={"train_noise": NoiseSpec(char=0.05, word=0.05, label=0.1, seed=3)}),
        SPEC.model_copy(update={"max_train_examples": 151}),
    ]
    fps = {task_fingerprint(s, tokenizer) for s in changed}
    assert len(fps) == len(changed) and base not in fps
    assert task_fingerprint(SPEC, tokenizer, eval_noise=NoiseSpec(word=0.1)) != base
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["[EXTRA]"])
    assert task_fingerprint(SPEC, other) != base
    assert task_fingerprint(SPEC.model_copy(update={"eval_noise_levels": [0.3]}), tokenizer) == base
    # local sources: the file's content counts, not its name or place
    rows = [{"text": r["text"], "label": r["label"]} for r in rt_rows[:20]]
    one = TaskSpec(name="l", files={"train": write_csv(tmp_path / "a.csv", rows, ["text", "label"])})
    two = TaskSpec(name="l", files={"train": write_csv(tmp_path / "b.csv", rows, ["text", "label"])})
    assert task_fingerprint(one, tokenizer) == task_fingerprint(two, tokenizer)
    write_csv(tmp_path / "b.csv", rows[:-1], ["text", "label"])
    assert task_fingerprint(one, tokenizer) != task_fingerprint(two, tokenizer)


def test_ref_round_trips_and_loads(small_builtin_refs: dict) -> None:
    ref = small_builtin_refs["rotten_tomatoes"]
    again = DatasetRef.from_json(ref.to_json())
    assert again == ref and hash(again) == hash(ref)
    assert {ref, again} == {ref}
    ds = ref.load("validation")
    assert {"input_ids", "attention_mask", "labels", "text", "clean_labels"} <= set(ds.column_names)
    assert len(ds) == ref.counts["validation"] == 60
    files = sorted(p.name for p in Path(ref.path).iterdir())
    assert ds.filter(lambda row: row["labels"] == 1).num_rows == sum(ds["labels"])
    assert sorted(p.name for p in Path(ref.path).iterdir()) == files  # nothing written into the entry
    assert ref.pad_token_id == 0 and ref.num_labels == 2
    with pytest.raises(KeyError, match="has no split 'dev'"):
        ref.load("dev")


def test_moved_cache_still_hits(tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = prepare_task(SPEC, tokenizer, tmp_path / "old", progress=False)
    (tmp_path / "old").rename(tmp_path / "new")
    monkeypatch.setattr(prepare_module, "_load_raw", None)  # would fail if called
    moved = prepare_task(SPEC, tokenizer, tmp_path / "new", progress=False)
    assert moved.fingerprint == ref.fingerprint and moved.path == str(tmp_path / "new" / Path(ref.path).name)
    assert len(moved.load("train")) == 150
