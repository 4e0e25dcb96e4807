"""Row validation before anything is written: each bad row gets one kind, the policy decides.

Kinds, checked in this order (a row counts under the first that applies):
`malformed` (a CSV record with the wrong field count, a JSON line that is not an object), `undecodable`
(bytes not valid in the file's encoding), `empty_text`, `missing_label`, `unknown_label` (outside the
declared set, or for an undeclared set outside the labels seen in train), `duplicate_across_splits`
(a validation/test text already in an earlier split; the later copy is the bad one).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sla_core.data.errors import DataSourceError, DataValidationError
from sla_core.data.raw import RawSplit, text_key
from sla_core.data.spec import TaskSpec

KINDS = (
    "malformed",
    "undecodable",
    "empty_text",
    "missing_label",
    "unknown_label",
    "duplicate_across_splits",
)
FIXES = {
    "malformed": "make the record match the header (CSV) or be one JSON object per line (JSON Lines)",
    "undecodable": "re-save the file as UTF-8 or set `files.encoding:` to the file's encoding (e.g. latin-1)",
    "empty_text": "fill in the text or delete the row",
    "missing_label": "fill in the label or delete the row",
    "unknown_label": "use one of the declared labels or add it to `labels:`",
    "duplicate_across_splits": "remove the copy from this split (it leaks an earlier split into evaluation)",
}
MAX_EXAMPLES = 10
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass
class BadRow:
    """One offending row: where it is, which column, what is wrong."""

    split: str
    source: str
    line: int
    column: str
    kind: str
    value: str

    def format(self) -> str:
        where = "row" if self.source.endswith((".parquet", ".pq", "]")) else "line"
        return (
            f"{self.source} {where} {self.line}, column {self.column!r}: {self.kind} ({self.value}) "
            f"-- fix: {FIXES[self.kind]}"
        )


@dataclass
class ValidationReport:
    """Counts of each bad-row kind and the first offending rows, with the policy outcome."""

    task: str
    policy: str
    max_skip_fraction: float
    total: int
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    examples: list[BadRow] = field(default_factory=list)
    dedupe: dict[str, int] = field(default_factory=dict)

    @property
    def n_bad(self) -> int:
        return sum(self.counts.values())

    @property
    def bad_fraction(self) -> float:
        return self.n_bad / self.total if self.total else 0.0

    @property
    def ok(self) -> bool:
        if self.policy == "error":
            return self.n_bad == 0
        return self.bad_fraction <= self.max_skip_fraction

    def format(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in self.counts.items() if n)
        head = (
            f"task {self.task!r}: {self.n_bad} of {self.total} rows are bad ({self.bad_fraction:.1%}), "
            f"policy {self.policy}"
            + (f" (max_skip_fraction {self.max_skip_fraction})" if self.policy == "skip" else "")
        )
        lines = [head, f"  {kinds or 'no bad rows'}"]
        lines += [f"  {ex.format()}" for ex in self.examples]
        if self.n_bad > len(self.examples):
            lines.append(f"  ... and {self.n_bad - len(self.examples)} more")
        if not self.ok:
            lines.append(
                "  Nothing was written. Fix the rows above, or set `validation: {policy: skip, "
                "max_skip_fraction: F}` with F above the bad fraction to drop them."
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(n_bad=self.n_bad, bad_fraction=self.bad_fraction, ok=self.ok)
        return d


def label_string(value: Any) -> str | None:
    """A raw label as a string; None when missing (None, NaN, empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    s = str(value).strip()
    return s or None


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def infer_labels(values: list[Any]) -> list[str]:
    """Label set from observed values: numeric order if all are integers, else sorted names."""
    names = {s for s in (label_string(v) for v in values) if s is not None}
    if names and all(_is_int(s) for s in names):
        return sorted(names, key=int)
    return sorted(names)


def resolve_label(value: Any, index: dict[str, int], n_labels: int) -> int | None:
    """Label id: a name in the set, else an integer used as an index into it; None if neither."""
    s = label_string(value)
    if s is None:
        return None
    if s in index:
        return index[s]
    if _is_int(s) and 0 <= int(s) < n_labels:
        return int(s)
    return None


def check_label_style(splits: dict[str, RawSplit], labels: list[str], declared: bool) -> None:
    """Refuse labels that mix names and integers: the integers would silently become indices.

    Integers that are themselves declared names (`labels: ["0", "other"]`) count as names.
    Raises:
        DataSourceError: naming the first integer label and the first name label, with their lines.
    """
    names = set(labels) if declared else set()
    first: dict[bool, tuple[str, int, str]] = {}
    for raw in splits.values():
        for i, value in enumerate(raw.label):
            s = label_string(value)
            if raw.problem[i] or s is None:
                continue
            first.setdefault(_is_int(s) and s not in names, (raw.source[i], raw.line[i], s))
            if len(first) == 2:
                (src_i, line_i, num), (src_n, line_n, name) = first[True], first[False]
                raise DataSourceError(
                    f"{src_i} line {line_i}: label {num!r} is a number, but {src_n} line {line_n} has the "
                    f"label name {name!r}; a number would be read as an index into {labels}; fix: write "
                    f"every label as a name, or every label as an index 0..{len(labels) - 1}"
                    + ("" if declared else " and declare the names with `labels:`")
                )


def _row_kind(raw: RawSplit, i: int, has_pair: bool, index: dict[str, int], n_labels: int) -> tuple[str, int]:
    """(kind or "", column slot: 0 text, 1 pair, 2 label)."""
    if raw.problem[i]:
        return raw.problem[i] or "", 0
    texts = [(raw.text[i], 0)] + ([(raw.text_pair[i], 1)] if has_pair and raw.text_pair is not None else [])
    for value, slot in texts + [(raw.label[i], 2)]:
        if isinstance(value, str) and _SURROGATE.search(value):
            return "undecodable", slot
    for value, slot in texts:
        if not isinstance(value, str) or not value.strip():
            return "empty_text", slot
    if label_string(raw.label[i]) is None:
        return "missing_label", 2
    if resolve_label(raw.label[i], index, n_labels) is None:
        return "unknown_label", 2
    return "", 0


def _shown(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def validate_splits(
    splits: dict[str, RawSplit], spec: TaskSpec, labels: list[str], dedupe_stats: dict[str, int] | None = None
) -> tuple[dict[str, RawSplit], dict[str, np.ndarray], ValidationReport]:
    """Check every row of every split, then apply the task's policy.

    Returns:
        (good rows per split, label ids per split, report).
    Raises:
        DataValidationError: under `error` with any bad row, or under `skip` above `max_skip_fraction`.
        DataSourceError: labels that mix names and integers.
    """
    check_label_style(splits, labels, spec.declared_labels is not None)
    index = {name: i for i, name in enumerate(labels)}
    columns = [spec.text_column, spec.text_pair_column or "", spec.label_column]
    has_pair = spec.text_pair_column is not None
    report = ValidationReport(
        spec.name,
        spec.validation.policy,
        spec.validation.max_skip_fraction,
        total=sum(len(r) for r in splits.values()),
        dedupe=dict(dedupe_stats or {}),
    )
    seen: set[str] = set()
    kept: dict[str, RawSplit] = {}
    ids: dict[str, np.ndarray] = {}
    for split in ("train", "validation", "test"):
        if split not in splits:
            continue
        raw = splits[split]
        good, keys = [], []
        for i in range(len(raw)):
            kind, slot = _row_kind(raw, i, has_pair, index, len(labels))
            key = ""
            if not kind:
                key = text_key(raw.text[i], raw.text_pair[i] if has_pair and raw.text_pair else None)
                if key in seen:
                    kind, slot = "duplicate_across_splits", 0
            if kind:
                report.counts[kind] += 1
                if len(report.examples) < MAX_EXAMPLES:
                    value = raw.label[i] if slot == 2 else (raw.text_pair if slot == 1 else raw.text)[i]
                    report.examples.append(
                        BadRow(split, raw.source[i], raw.line[i], columns[slot], kind, _shown(value))
                    )
                continue
            good.append(i)
            keys.append(key)
        seen.update(keys)
        kept[split] = raw.take(good)
        ids[split] = np.array(
            [resolve_label(v, index, len(labels)) for v in kept[split].label], dtype=np.int64
        )
    if not report.ok:
        raise DataValidationError(report)
    return kept, ids, report
