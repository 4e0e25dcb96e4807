"""`DatasetRef`, the artefact that crosses the data-stage boundary, and the on-disk cache it points to.

A prepared dataset is a folder `<cache_dir>/<task>-<fingerprint[:16]>/` holding one Arrow IPC stream per
split (`train.arrow`, ...), `ref.json` and `report.json`. Folders are built under a temporary name inside
`cache_dir` and renamed into place, so a failure never leaves a half-written or altered entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

FORMAT_VERSION = 1


@dataclass(frozen=True)
class DatasetRef:
    """A prepared, tokenized dataset on disk.

    Attributes:
        task: task name. path: the dataset folder. fingerprint: sha256 of every input that shapes the data.
        labels: label names; label id i is labels[i]. counts: rows per split.
        noise: per split, the requested noise spec and the measured ratios (and raw counts).
        skipped: bad rows dropped under the `skip` policy, per kind.
        pad_token_id / tokenizer / max_length / text_pair: what batching and noisy re-evaluation need.
    """

    task: str
    path: str
    fingerprint: str
    labels: list[str]
    counts: dict[str, int]
    noise: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    pad_token_id: int = 0
    tokenizer: str = ""
    max_length: int = 128
    text_pair: bool = False

    def __hash__(self) -> int:
        return hash((self.task, self.path, self.fingerprint))

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def splits(self) -> list[str]:
        return [s for s in ("train", "validation", "test") if s in self.counts]

    def split_path(self, split: str) -> Path:
        """The Arrow file of `split`."""
        if split not in self.counts:
            raise KeyError(f"dataset {self.task!r} has no split {split!r}; it has {self.splits}")
        return Path(self.path) / f"{split}.arrow"

    def load(self, split: str) -> Any:
        """The split as a `datasets.Dataset` with columns input_ids, attention_mask, labels, clean_labels,
        text (and text_pair), source, line. The file is memory-mapped; `.map`/`.filter` results stay in
        memory, so nothing is ever written into the cache entry."""
        import datasets
        from datasets.table import InMemoryTable

        return datasets.Dataset(InMemoryTable(read_arrow(self.split_path(split))))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> DatasetRef:
        d = json.loads(data) if isinstance(data, str) else dict(data)
        return cls(**d)


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what makes a tokenizer's output: name, class, vocabulary (hashed) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    desc = {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha": stable_hash(vocab),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
    }
    return stable_hash(desc)


def pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: pad, else eos, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def entry_dir(cache_dir: Path, task: str, fingerprint: str) -> Path:
    return Path(cache_dir) / f"{task}-{fingerprint[:16]}"


def read_cached(folder: Path, fingerprint: str) -> DatasetRef | None:
    """The ref stored in `folder` if it is complete and has this fingerprint, else None."""
    ref_file = folder / "ref.json"
    if not ref_file.is_file():
        return None
    try:
        ref = DatasetRef.from_json(ref_file.read_text(encoding="utf-8"))
    except (ValueError, TypeError):
        return None
    if ref.fingerprint != fingerprint or not all((folder / f"{s}.arrow").is_file() for s in ref.counts):
        return None
    # The folder may have moved since it was written; point at where it is now.
    return DatasetRef.from_json({**json.loads(ref.to_json()), "path": str(folder.resolve())})


def write_arrow(table: pa.Table, path: Path) -> None:
    """Write `table` as one Arrow IPC stream (what `datasets.Dataset.from_file` memory-maps)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_stream(source).read_all()


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success rename it to `final`, on error remove it.

    If another process created `final` first (same fingerprint, same content), ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "ref.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
