"""Readers for user datasets: local CSV/TSV, JSON Lines and Parquet files, and hub datasets.

Local text files are decoded with `errors="surrogateescape"`, so undecodable bytes survive as lone
surrogates and validation can point at the exact line instead of the whole file failing to load.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import os
import socket
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from sla_core.data.errors import DataSourceError
from sla_core.data.raw import RawSplit
from sla_core.data.spec import HubSource, TaskSpec

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def file_format(path: Path) -> tuple[str, str | None]:
    """(format, compression) from the extension, e.g. `train.csv.gz` -> ("csv", "gzip")."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = {".gz": "gzip", ".bz2": "bz2"}.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None or (fmt == "parquet" and compression):
        raise DataSourceError(
            f"{path}: unknown data format; use .csv, .tsv, .jsonl/.json (JSON Lines) or .parquet "
            "(text formats may end in .gz or .bz2)"
        )
    return fmt, compression


def _open_text(path: Path, compression: str | None, encoding: str) -> IO[str]:
    if encoding.lower().replace("-", "").replace("_", "") == "utf8":
        encoding = "utf-8-sig"  # drops a leading BOM before any parsing, so a quoted first name still parses
    kwargs: dict[str, Any] = {"encoding": encoding, "errors": "surrogateescape", "newline": ""}
    if compression == "gzip":
        return gzip.open(path, "rt", **kwargs)
    if compression == "bz2":
        return bz2.open(path, "rt", **kwargs)
    return open(path, encoding=encoding, errors="surrogateescape", newline="")


def _short(value: Any, width: int = 30) -> str:
    text = str(value)
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def _missing_column(
    path: Path | str, column: str, available: list[str], key: str, task: str
) -> DataSourceError:
    return DataSourceError(
        f"{path}: no column {column!r} (columns: {', '.join(_short(c) for c in available)}); "
        f"fix: set `{key}:` of task {task!r} to one of them"
    )


def _looks_like_data(header: list[str], spec: TaskSpec) -> bool:
    """Whether a first row reads as data rather than names: a long or many-word field, or a label value."""
    labels = set(spec.labels or [])
    return any(len(h) > 40 or len(h.split()) > 4 or h in labels for h in header)


def _columns(spec: TaskSpec) -> list[tuple[str, str]]:
    cols = [("text", spec.text_column), ("label", spec.label_column)]
    if spec.text_pair_column:
        cols.append(("text_pair", spec.text_pair_column))
    return cols


def _empty_split(spec: TaskSpec) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"text": [], "label": [], "line": [], "problem": []}
    if spec.text_pair_column:
        out["text_pair"] = []
    return out


def _to_raw(rows: dict[str, list[Any]], source: str) -> RawSplit:
    return RawSplit(
        text=rows["text"],
        label=rows["label"],
        line=rows["line"],
        source=[source] * len(rows["text"]),
        text_pair=rows.get("text_pair"),
        problem=rows["problem"],
    )


# Python's default (128 Ki characters) rejects long documents; 16 Mi characters is far more than any
# tokenizer keeps (max_length is at most 32768 tokens) and still bounds memory on a runaway field.
FIELD_SIZE_LIMIT = 16 * 2**20


class _LineTap:
    """Iterates a text file and keeps the physical lines read since the last `take()`.

    The csv reader asks for lines only until its record ends, so the lines taken after each record are
    exactly the physical lines that record spans.
    """

    def __init__(self, f: IO[str]) -> None:
        self._it = iter(f)
        self.lines: list[str] = []

    def __iter__(self) -> _LineTap:
        return self

    def __next__(self) -> str:
        line = next(self._it)
        self.lines.append(line)
        return line

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


def _quote_line(lines: list[str], start: int) -> int:
    """The line on which a quoted field opens and stays open: the first line with an odd count of quotes."""
    return next((start + i for i, line in enumerate(lines) if line.count('"') % 2), start)


def _multiline_problem(lines: list[str], delimiter: str, n_fields: int) -> str | None:
    """Why a record over several lines is not one well-formed record (strict parse, header's field count)."""
    try:
        records = list(csv.reader(lines, delimiter=delimiter, strict=True))
    except csv.Error as err:
        return str(err)
    if len(records) != 1 or len(records[0]) != n_fields:
        return f"{len(records[0]) if records else 0} fields, the header has {n_fields}"
    return None


def _runaway_quote(path: Path, lines: list[str], start: int, why: str) -> DataSourceError:
    opened, end = _quote_line(lines, start), start + len(lines) - 1
    return DataSourceError(
        f"{path} line {opened}: a quoted field opens here and does not close properly (lines {start}-{end}, "
        f"{len(lines)} physical lines, would be read as one record: {why}), so the rows on those lines "
        'would be lost; fix: close the quote, and write a quote inside a quoted field as two quotes ("")'
    )


def _csv_error(path: Path, lines: list[str], start: int, err: csv.Error) -> DataSourceError:
    if len(lines) > 1:
        return _runaway_quote(path, lines, start, str(err))
    if "field larger than field limit" in str(err):
        return DataSourceError(
            f"{path} line {start}: a field is longer than {csv.field_size_limit()} characters; "
            "fix: shorten the text (the model reads at most `max_length` tokens) or split the row"
        )
    return DataSourceError(f"{path} line {start}: cannot parse the record ({err}); fix the record")


def _header_index(path: Path, header: list[str], spec: TaskSpec) -> dict[str, int]:
    dupes = sorted({h for h in header if h and header.count(h) > 1})
    if dupes:
        raise DataSourceError(
            f"{path}: the header repeats the column name(s) {dupes}; fix: give every column its own name"
        )
    index = {}
    for key, col in _columns(spec):
        if col not in header:
            if _looks_like_data(header, spec):
                raise DataSourceError(
                    f"{path}: no column {col!r}, and the first row reads as data, not column names "
                    f"({', '.join(_short(h) for h in header)}); fix: if the file has no header row, name its "
                    f"columns in order under `files:` of task {spec.name!r}, e.g. `columns: "
                    f"[{spec.label_column}, {spec.text_column}]` (or `header: false` with `columns:`)"
                )
            raise _missing_column(path, col, header, f"{key}_column", spec.name)
        index[key] = header.index(col)
    return index


def read_csv(
    path: Path, spec: TaskSpec, encoding: str, delimiter: str = ",", compression: str | None = None
) -> RawSplit:
    """Read a CSV/TSV file with a header; each row keeps the line its record starts on.

    A quoted field may hold newlines (RFC 4180) only inside a record that parses strictly with the header's
    field count; a record over several lines that does not is a quote left open, and the whole file is
    refused (skipping it would silently drop every row it swallowed).
    Raises:
        DataSourceError: naming the line of an open quote, of a field over the size limit, or the
            repeated column names.
    """
    if csv.field_size_limit() < FIELD_SIZE_LIMIT:
        csv.field_size_limit(FIELD_SIZE_LIMIT)
    rows = _empty_split(spec)
    with _open_text(path, compression, encoding) as f:
        tap = _LineTap(f)
        reader = csv.reader(tap, delimiter=delimiter)
        start = 1
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise _csv_error(path, tap.take(), start, err) from err
        if header is None:
            raise DataSourceError(f"{path}: the file is empty; fix: add a header row and data rows")
        header = [h.strip().lstrip("\ufeff") for h in header]  # a BOM of another encoding than UTF-8
        if len(tap.lines) > 1 and (why := _multiline_problem(tap.lines, delimiter, len(header))):
            raise _runaway_quote(path, tap.take(), start, f"the header: {why}")
        names = spec.files.columns if spec.files is not None else None
        if names is not None:  # no header row: the first record is data, read again below
            if len(header) != len(names):
                raise DataSourceError(
                    f"{path} line 1: {len(header)} fields, but `columns:` of task {spec.name!r} names "
                    f"{len(names)} ({names}); fix `columns:` to name every column in order"
                )
            first, header = header, list(names)
        index = _header_index(path, header, spec)
        lines = tap.take()
        if names is not None:
            _add_record(rows, index, first, start, len(first) != len(header))
        start += len(lines)
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise _csv_error(path, tap.take(), start, err) from err
            lines = tap.take()
            line, start = start, start + len(lines)
            if not record:
                continue
            if len(lines) > 1 and (why := _multiline_problem(lines, delimiter, len(header))):
                raise _runaway_quote(path, lines, line, why)
            _add_record(rows, index, record, line, len(record) != len(header))
    return _to_raw(rows, str(path))


def _add_record(rows: dict[str, list[Any]], index: dict[str, int], record: list[str], line: int, bad: bool):
    for key, i in index.items():
        rows[key].append(record[i] if i < len(record) else None)
    rows["line"].append(line)
    rows["problem"].append("malformed" if bad else None)


def read_jsonl(path: Path, spec: TaskSpec, encoding: str, compression: str | None = None) -> RawSplit:
    """Read JSON Lines: one object per line; a line that is not a JSON object is a malformed row."""
    rows = _empty_split(spec)
    cols = _columns(spec)
    seen_keys: set[str] = set()
    with _open_text(path, compression, encoding) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            ok = isinstance(obj, dict)
            if ok:
                seen_keys.update(obj)
            for key, col in cols:
                value = obj.get(col) if ok else None
                if key != "label" and value is not None and not isinstance(value, str):
                    value = str(value)
                rows[key].append(value)
            rows["line"].append(lineno)
            rows["problem"].append(None if ok else "malformed")
    if rows["line"] and not seen_keys:
        raise DataSourceError(
            f"{path}: no line is a JSON object; fix: write JSON Lines (one object per line)"
        )
    for key, col in cols:
        if seen_keys and col not in seen_keys:
            raise _missing_column(path, col, sorted(seen_keys), f"{key}_column", spec.name)
    return _to_raw(rows, str(path))


def _decode(value: Any, encoding: str) -> Any:
    if isinstance(value, bytes):
        return value.decode(encoding, errors="surrogateescape")
    return value


def read_parquet(path: Path, spec: TaskSpec, encoding: str) -> RawSplit:
    """Read a Parquet file; `line` is the 1-based row number."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataSourceError(f"{path}: repeated column name(s) {dupes}; fix: give every column its own name")
    table = pq.read_table(path)
    rows = _empty_split(spec)
    for key, col in _columns(spec):
        if col not in table.column_names:
            raise _missing_column(path, col, table.column_names, f"{key}_column", spec.name)
        rows[key] = [_decode(v, encoding) for v in table.column(col).to_pylist()]
    rows["line"] = list(range(1, table.num_rows + 1))
    rows["problem"] = [None] * table.num_rows
    return _to_raw(rows, str(path))


def check_data_file(path: Path, task: str) -> None:
    """Raise DataSourceError unless `path` is a readable file (a directory is named as one)."""
    if path.is_dir():
        raise DataSourceError(
            f"{path}: is a directory, not a data file (task {task!r}); fix: name a .csv, .tsv, .jsonl "
            "or .parquet file under `files:`"
        )
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file (task {task!r}); fix the path under `files:`")


def read_local_file(path: Path, spec: TaskSpec, encoding: str = "utf-8") -> RawSplit:
    """Read one local file in the format its extension names."""
    check_data_file(path, spec.name)
    fmt, compression = file_format(path)
    if fmt in ("jsonl", "parquet") and spec.files is not None and spec.files.columns is not None:
        raise DataSourceError(
            f"{path}: `columns:` (task {spec.name!r}) names the columns of a CSV/TSV file without a header; "
            f"{fmt} rows carry their own names: drop `columns:` and set `text_column:`/`label_column:`"
        )
    if fmt == "parquet":
        return read_parquet(path, spec, encoding)
    if fmt == "jsonl":
        return read_jsonl(path, spec, encoding, compression)
    return read_csv(path, spec, encoding, "\t" if fmt == "tsv" else ",", compression)


def read_local(spec: TaskSpec) -> dict[str, RawSplit]:
    """Read the splits named under `files:` (validation/test may be absent)."""
    assert spec.files is not None
    out = {"train": read_local_file(spec.files.train, spec, spec.files.encoding)}
    for split in ("validation", "test"):
        path = getattr(spec.files, split)
        if path is not None:
            out[split] = read_local_file(path, spec, spec.files.encoding)
    return out


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint answers a TCP connect; False at once where DNS or routing fails."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_error(hub: HubSource, reason: str) -> DataSourceError:
    return DataSourceError(
        f"hub dataset {hub.path!r} (config {hub.config!r}) cannot be loaded: {reason}. "
        "This machine is offline or cannot reach the hub; fix: copy the data here and use `source: local` "
        "with `files:`, point `hub.path` at a local dataset folder, or run where the hub is reachable"
    )


def _load_hub_split(hub: HubSource, split: str, offline: bool, reason: str) -> Any:
    """`datasets.load_dataset` for one split; offline, only datasets already in the local cache load."""
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline
    try:
        return datasets.load_dataset(hub.path, hub.config, split=split, revision=hub.revision)
    except (ConnectionError, OSError) as err:
        raise _offline_error(hub, reason if offline else f"{type(err).__name__}: {err}") from err
    except ValueError as err:  # unknown split or config
        raise DataSourceError(f"hub dataset {hub.path!r}: {err}; fix `hub.splits` / `hub.config`") from err
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def read_hub(spec: TaskSpec) -> tuple[dict[str, RawSplit], list[str] | None]:
    """Load the named splits with `datasets.load_dataset` (a hub name or a local dataset folder).

    When offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, or the endpoint does not answer a connect),
    loading runs in offline mode, so a dataset missing from the local cache fails at once.
    Returns:
        (raw splits, label names if the label column is a ClassLabel, else None).
    Raises:
        DataSourceError: naming the dataset and saying it is offline, or naming a missing column.
    """
    import datasets

    hub = spec.hub
    assert hub is not None
    offline, reason = bool(datasets.config.HF_HUB_OFFLINE), "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set"
    if not offline and not os.path.isdir(hub.path) and not hub_reachable():
        offline, reason = True, "the hub endpoint does not answer"
    out: dict[str, RawSplit] = {}
    names: list[str] | None = None
    for split in ("train", "validation", "test"):
        hub_split = getattr(hub.splits, split)
        if hub_split is None:
            continue
        ds = _load_hub_split(hub, hub_split, offline, reason)
        source = f"{hub.path}[{hub_split}]"
        rows = _empty_split(spec)
        for key, col in _columns(spec):
            if col not in ds.column_names:
                raise _missing_column(source, col, ds.column_names, f"{key}_column", spec.name)
            rows[key] = list(ds[col])
        if isinstance(ds.features[spec.label_column], datasets.ClassLabel):
            names = list(ds.features[spec.label_column].names)
        rows["line"] = list(range(1, len(ds) + 1))
        rows["problem"] = [None] * len(ds)
        out[split] = _to_raw(rows, source)
    return out, names


def source_digest(path: Path) -> str:
    """sha256 of a file's bytes (the local part of a dataset fingerprint)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
