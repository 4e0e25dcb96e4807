"""Each source kind: the three builtins, local CSV/TSV/JSON Lines/Parquet (single text and pairs), hub."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from sla_core.data import DataSourceError, TaskSpec, prepare_task
from sla_core.data.builtin import load_builtin
from sla_core.data.raw import group_split
from tests.sla_core.data.helpers import write_csv, write_jsonl, write_parquet


def _texts(ref: Any, split: str) -> list[str]:
    return ref.load(split)["text"]


def test_rotten_tomatoes_is_movie_disjoint_deduplicated_and_plot_free(small_builtin_refs: dict) -> None:
    raw, stats = load_builtin("rotten_tomatoes")
    assert set(raw.label) == {"fresh", "rotten"}  # plot rows dropped
    assert len(raw) == len({" ".join(t.split()).casefold() for t in raw.text}) == 12751
    assert stats["duplicates_dropped"] > 0
    ref = small_builtin_refs["rotten_tomatoes"]
    assert ref.labels == ["rotten", "fresh"]
    movie_of = {t: g for t, g in zip(raw.text, raw.group or [], strict=True)}
    movies = {s: {movie_of[t] for t in _texts(ref, s)} for s in ("train", "validation", "test")}
    assert not movies["train"] & movies["test"] and not movies["train"] & movies["validation"]
    assert not movies["validation"] & movies["test"]


@pytest.mark.parametrize("name", ["rotten_tomatoes", "tweets", "bbc_news"])
def test_builtin_split_proportions_are_fixed(name: str) -> None:
    raw, _ = load_builtin(name)
    parts = group_split(raw.group or [], (0.8, 0.1, 0.1), seed=0)
    sizes = [len(p) / len(raw) for p in parts]
    assert sum(len(p) for p in parts) == len(raw)
    assert sizes == pytest.approx([0.8, 0.1, 0.1], abs=0.02)
    assert [len(p) for p in group_split(raw.group or [], (0.8, 0.1, 0.1), seed=0)] == [len(p) for p in parts]


def test_builtin_splits_follow_split_seed(tokenizer: Any, tmp_path: Path) -> None:
    def split_texts(seed: int) -> set[str]:
        spec = TaskSpec(name="rotten_tomatoes", max_length=8, max_train_examples=20, split_seed=seed)
        ref = prepare_task(spec, tokenizer, tmp_path, progress=False)
        assert ref.counts["train"] == 20 and ref.counts["validation"] > 1000
        return set(_texts(ref, "test"))

    assert split_texts(0) != split_texts(1)


def test_tweets_three_classes_from_latin1(small_builtin_refs: dict) -> None:
    raw, stats = load_builtin("tweets")
    assert sorted(set(raw.label)) == ["negative", "neutral", "positive"]
    assert any("\u00d1" in t for t in raw.text)  # a latin-1 byte decoded, not dropped
    assert stats["conflicting_dropped"] > 0
    ref = small_builtin_refs["tweets"]
    assert ref.labels == ["negative", "neutral", "positive"]
    assert ref.counts == {"train": 300, "validation": 60, "test": 60}
    assert set(ref.load("train")["labels"]) == {0, 1, 2}


def test_bbc_news_five_topics(small_builtin_refs: dict) -> None:
    raw, _ = load_builtin("bbc_news")
    assert sorted(set(raw.label)) == ["business", "entertainment", "politics", "sports", "tech"]
    assert any("\u00a315.8m" in t for t in raw.text)  # the cp1252 file
    ref = small_builtin_refs["bbc_news"]
    row = ref.load("train")[0]
    assert len(row["input_ids"]) == 128 and row["input_ids"][0] == 101  # truncated BERT [CLS] ...
    assert row["attention_mask"] == [1] * 128


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet", ".csv.gz"])
def test_local_files_each_format(suffix: str, rt_rows: list, tokenizer: Any, tmp_path: Path) -> None:
    rows = rt_rows[:60]
    path = tmp_path / f"reviews{suffix}"
    fields = ["review", "verdict"]
    data = [{"review": r["text"], "verdict": r["label"]} for r in rows]
    if suffix == ".jsonl":
        write_jsonl(path, data)
    elif suffix == ".parquet":
        write_parquet(path, data, fields)
    elif suffix == ".csv.gz":
        import gzip

        plain = write_csv(tmp_path / "plain.csv", data, fields)
        path.write_bytes(gzip.compress(plain.read_bytes()))
    else:
        write_csv(path, data, fields, delimiter="\t" if suffix == ".tsv" else ",")
    spec = TaskSpec(name="rt_local", files={"train": path}, text_column="review", label_column="verdict")
    assert spec.source == "local"
    ref = prepare_task(spec, tokenizer, tmp_path / "cache", progress=False)
    assert ref.labels == ["fresh", "rotten"]  # inferred, sorted
    assert sum(ref.counts.values()) == 60 and min(ref.counts.values()) > 0
    got = {
        t: ref.labels[y]
        for s in ref.splits
        for t, y in zip(_texts(ref, s), ref.load(s)["labels"], strict=True)
    }
    assert got == {r["text"]: r["label"] for r in rows}


def test_local_integer_labels_and_given_splits(rt_rows: list, tokenizer: Any, tmp_path: Path) -> None:
    ids = {"rotten": 0, "fresh": 1}
    split_rows = {"train": rt_rows[:80], "validation": rt_rows[80:100], "test": rt_rows[100:120]}
    files = {}
    for split, rows in split_rows.items():
        files[split] = write_csv(
            tmp_path / f"{split}.csv",
            [{"text": r["text"], "label": ids[r["label"]]} for r in rows],
            ["text", "label"],
        )
    spec = TaskSpec(name="rt_ints", files=files, labels=["neg", "pos"])
    ref = prepare_task(spec, tokenizer, tmp_path / "cache", progress=False)
    assert ref.counts == {"train": 80, "validation": 20, "test": 20}
    assert ref.load("test")["labels"] == [ids[r["label"]] for r in split_rows["test"]]
    assert ref.load("test")["line"] == list(range(2, 22))


def test_local_text_pairs(rt_rows: list, tokenizer: Any, tmp_path: Path) -> None:
    """NLI/BoolQ-style: does the review (premise) talk about this movie (hypothesis)?"""
    rng = random.Random(0)
    movies = sorted({r["movie"] for r in rt_rows[:400]})
    pairs = []
    for i, r in enumerate(rt_rows[:120]):
        other = rng.choice([m for m in movies if m != r["movie"]])
        movie = r["movie"] if i % 2 else other
        pairs.append(
            {
                "premise": r["text"],
                "hypothesis": movie.replace("_", " "),
                "label": "yes" if movie == r["movie"] else "no",
            }
        )
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    spec = TaskSpec(
        name="rt_pairs",
        files={"train": path},
        text_column="premise",
        text_pair_column="hypothesis",
        label_column="label",
        labels=["no", "yes"],
        max_length=48,
    )
    ref = prepare_task(spec, tokenizer, tmp_path / "cache", progress=False)
    assert ref.text_pair and sum(ref.counts.values()) == 120
    ds = ref.load("train")
    row = ds[0]
    assert row["text_pair"] in {p["hypothesis"] for p in pairs}
    assert row["input_ids"].count(tokenizer.sep_token_id) == 2 and len(row["input_ids"]) <= 48


def test_missing_column_names_file_column_and_fix(rt_rows: list, tokenizer: Any, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "t.csv",
        [{"sentence": r["text"], "label": r["label"]} for r in rt_rows[:5]],
        ["sentence", "label"],
    )
    with pytest.raises(
        DataSourceError, match=r"t\.csv: no column 'text' \(columns: 'sentence', 'label'\).*text_column"
    ):
        prepare_task(TaskSpec(name="x", files={"train": path}), tokenizer, tmp_path / "c", progress=False)
    xlsx = tmp_path / "t.xlsx"
    xlsx.write_bytes(path.read_bytes())
    with pytest.raises(DataSourceError, match=r"t\.xlsx: unknown data format; use \.csv"):
        prepare_task(TaskSpec(name="x", files={"train": xlsx}), tokenizer, tmp_path / "c", progress=False)
    with pytest.raises(DataSourceError, match=r"nope\.csv: no such file"):
        prepare_task(
            TaskSpec(name="x", files={"train": tmp_path / "nope.csv"}),
            tokenizer,
            tmp_path / "c",
            progress=False,
        )


def test_hub_path_loads_local_dataset_folder_with_classlabel(
    rt_rows: list, tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real `datasets.load_dataset` path, on a dataset folder (what a hub download is)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    names = ["rotten", "fresh"]
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    folder = tmp_path / "rt_hub"
    folder.mkdir()
    for split, rows in {"train": rt_rows[:60], "test": rt_rows[60:80]}.items():
        ds = datasets.Dataset.from_dict(
            {"sentence": [r["text"] for r in rows], "label": [names.index(r["label"]) for r in rows]},
            features=features,
        )
        ds.to_parquet(str(folder / f"{split}.parquet"))
    spec = TaskSpec(
        name="rt_hub", hub={"path": str(folder), "splits": {"validation": None}}, text_column="sentence"
    )
    ref = prepare_task(spec, tokenizer, tmp_path / "cache", progress=False)
    assert ref.labels == names  # from the ClassLabel feature
    assert ref.counts["test"] == 20 and ref.counts["train"] + ref.counts["validation"] == 60
    assert ref.load("test")["text"] == [r["text"] for r in rt_rows[60:80]]


def test_hub_name_offline_fails_at_once_with_clear_message(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    import datasets

    from sla_core.data import readers

    spec = TaskSpec(name="sst2", hub={"path": "glue", "config": "sst2"}, text_column="sentence")
    modes = [True] + ([] if readers.hub_reachable() else [False])  # the env flag, then a real failing connect
    # "At once" as behaviour, not seconds: offline, no connection is attempted at all; unreachable, the one
    # bounded reachability probe is the only connect, and nothing is retried.
    probes: list[float] = []
    stray: list[Any] = []
    real_probe, real_connect = readers.hub_reachable, socket.socket.connect

    def probe(timeout: float = 3.0) -> bool:
        probes.append(timeout)
        try:
            return real_probe(timeout)
        finally:
            probes.append(-1.0)  # the probe ended: connects after this one are stray

    def connect(sock: socket.socket, address: Any) -> Any:
        if not probes or probes[-1] == -1.0:
            stray.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(readers, "hub_reachable", probe)
    monkeypatch.setattr(socket.socket, "connect", connect)
    for offline in modes:
        probes.clear()
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
        with pytest.raises(DataSourceError, match=r"hub dataset 'glue' .*offline.*source: local"):
            prepare_task(spec, tokenizer, tmp_path / "cache", progress=False)
        assert probes == ([] if offline else [3.0, -1.0]) and stray == [], (offline, probes, stray)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_csv_with_byte_order_mark(rt_rows: list, tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    body = "".join(f'"{r["text"]}",{r["label"]}\n' for r in rt_rows[:30] if '"' not in r["text"])
    path.write_text("text,label\n" + body, encoding="utf-8-sig")
    ref = prepare_task(TaskSpec(name="bom", files={"train": path}), tokenizer, tmp_path / "c", progress=False)
    assert ref.labels == ["fresh", "rotten"] and sum(ref.counts.values()) == body.count("\n")
