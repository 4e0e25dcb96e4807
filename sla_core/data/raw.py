"""Raw rows as read from a source, before validation: parallel lists that remember where each row is from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RawSplit:
    """Rows of one split. `line` is the 1-based line in `source` (the row number for Parquet/hub data).

    `problem` holds a reader-detected problem per row (e.g. "malformed"), else None.
    `group` keys rows that must stay in one split (movie, or identical text).
    """

    text: list[Any]
    label: list[Any]
    line: list[int]
    source: list[str]
    text_pair: list[Any] | None = None
    group: list[str] | None = None
    problem: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.problem:
            self.problem = [None] * len(self.text)
        n = len(self.text)
        for name in ("label", "line", "source", "text_pair", "group", "problem"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"RawSplit.{name} has {len(values)} rows, text has {n}")

    def __len__(self) -> int:
        return len(self.text)

    def take(self, idx: Sequence[int] | np.ndarray) -> RawSplit:
        """The rows at `idx`, in that order."""
        idx = [int(i) for i in idx]

        def pick(values: list[Any] | None) -> list[Any] | None:
            return None if values is None else [values[i] for i in idx]

        return RawSplit(
            text=pick(self.text),
            label=pick(self.label),
            line=pick(self.line),
            source=pick(self.source),
            text_pair=pick(self.text_pair),
            group=pick(self.group),
            problem=pick(self.problem) or [],
        )


def text_key(text: Any, pair: Any = None) -> str:
    """Key under which texts count as duplicates: whitespace-normalised and case-folded."""
    key = " ".join(str(text).split()).casefold() if isinstance(text, str) else ""
    if pair is not None:
        key += "\x1f" + (" ".join(str(pair).split()).casefold() if isinstance(pair, str) else "")
    return key


def dedupe(raw: RawSplit) -> tuple[RawSplit, dict[str, int]]:
    """Keep the first row of each text; drop every copy of a text whose copies disagree on the label.

    Returns:
        (deduplicated rows, {"duplicates_dropped": n, "conflicting_dropped": m}).
    """
    pairs = raw.text_pair if raw.text_pair is not None else [None] * len(raw)
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    keys = []
    for i, (t, p, y) in enumerate(zip(raw.text, pairs, raw.label, strict=True)):
        k = text_key(t, p)
        keys.append(k)
        if k not in first:
            first[k] = i
        elif str(raw.label[first[k]]) != str(y):
            conflicting.add(k)
    keep = [i for i, k in enumerate(keys) if first[k] == i and k not in conflicting]
    n_conflict = sum(1 for k in keys if k in conflicting)
    stats = {"duplicates_dropped": len(raw) - len(keep) - n_conflict, "conflicting_dropped": n_conflict}
    return raw.take(keep), stats


def group_split(groups: Sequence[str], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Assign whole groups to splits in seeded random order until each split's row share is reached.

    Returns:
        one sorted index array per fraction; the groups of different arrays are disjoint.
    """
    names = sorted(set(groups))
    position = {g: i for i, g in enumerate(names)}
    inverse = np.fromiter((position[g] for g in groups), dtype=np.int64, count=len(groups))
    sizes = np.bincount(inverse, minlength=len(names))
    order = np.random.default_rng([seed, 7919]).permutation(len(names))
    start = np.cumsum(np.concatenate([[0], sizes[order]]))[:-1] / max(len(groups), 1)
    bounds = np.cumsum(fractions)[:-1]
    split_of_group = np.empty(len(names), dtype=np.int64)
    split_of_group[order] = np.searchsorted(bounds, start, side="right")
    split_of_row = split_of_group[inverse]
    return [np.flatnonzero(split_of_row == s) for s in range(len(fractions))]
