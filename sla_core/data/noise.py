"""Controlled, seeded noise: character, word and label level, each measured as it is applied.

Ratios (see `sla_core.data.spec`): char = operations per alphanumeric character, word = operations per
word, label = flipped rows per row. Each text gets floor(ratio * n + u) operations, u ~ U(0, 1), at
distinct positions, so the expected count is exactly ratio * n and the split-level ratio is close to it.
Every operation changes its text, and the counts reported are of operations actually applied.
Randomness comes from one generator per (seed, purpose, row), so a row's noise does not depend on the
other rows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import numpy as np
from tqdm.auto import tqdm

_ROWS = ["1234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm"]


def _keyboard_neighbours() -> dict[str, str]:
    """Adjacent keys on a QWERTY layout (same row left/right, rows above/below, offset by the stagger)."""
    out: dict[str, str] = {}
    for r, row in enumerate(_ROWS):
        for c, ch in enumerate(row):
            near = [row[c - 1] if c > 0 else "", row[c + 1] if c + 1 < len(row) else ""]
            for rr, cols in ((r - 1, (c, c + 1)), (r + 1, (c - 1, c))):
                if 0 <= rr < len(_ROWS):
                    near += [_ROWS[rr][cc] for cc in cols if 0 <= cc < len(_ROWS[rr])]
            out[ch] = "".join(n for n in near if n)
    return out


KEYBOARD = _keyboard_neighbours()
# OCR confusions: two characters read as one and back, and look-alike single characters.
OCR_PAIRS = {"rn": "m", "cl": "d", "vv": "w"}
OCR_SINGLE = {
    "m": "rn",
    "d": "cl",
    "w": "vv",
    "0": "O",
    "O": "0",
    "o": "0",
    "1": "l",
    "l": "1",
    "I": "l",
    "5": "S",
    "S": "5",
    "8": "B",
    "B": "8",
    "e": "c",
    "c": "e",
    "g": "9",
    "h": "b",
    "u": "v",
}
CHAR_OPS = ("keyboard", "ocr", "insert", "delete", "transpose")
WORD_OPS = ("drop", "swap", "replace")
_LOWER = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class NoiseCounts:
    """Operations applied and the units they were drawn from."""

    char_ops: int = 0
    chars: int = 0
    word_ops: int = 0
    words: int = 0
    label_flips: int = 0
    rows: int = 0

    def __add__(self, other: NoiseCounts) -> NoiseCounts:
        return NoiseCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def measured(self) -> dict[str, float]:
        """Measured ratios, the quantities the requested ratios mean."""
        return {
            "char": self.char_ops / self.chars if self.chars else 0.0,
            "word": self.word_ops / self.words if self.words else 0.0,
            "label": self.label_flips / self.rows if self.rows else 0.0,
        }


def row_rng(seed: int, purpose: str, row: int) -> random.Random:
    """The generator for one row; string seeds hash deterministically across runs and platforms."""
    return random.Random(f"{seed}/{purpose}/{row}")


def _count(ratio: float, n: int, rng: random.Random) -> int:
    return min(n, int(ratio * n + rng.random()))


def _neighbour(ch: str, rng: random.Random) -> str:
    near = KEYBOARD.get(ch.lower())
    if not near:
        near = _LOWER.replace(ch.lower(), "")
    out = rng.choice(near)
    return out.upper() if ch.isupper() else out


def char_noise(text: str, ratio: float, rng: random.Random) -> tuple[str, int, int]:
    """Perturb about `ratio` of the alphanumeric characters of `text`.

    Returns:
        (noisy text, operations applied, alphanumeric characters).
    """
    eligible = [i for i, ch in enumerate(text) if ch.isalnum()]
    k = _count(ratio, len(eligible), rng) if ratio > 0 else 0
    if k == 0:
        return text, 0, len(eligible)
    chosen = sorted(rng.sample(eligible, k))
    chosen_set = set(chosen)
    out: list[str] = []
    done = 0  # text[:done] is already in `out`
    for i in chosen:
        out.append(text[done:i])
        done = i + 1 + _apply_char_op(text, i, i + 1 < len(text) and i + 1 not in chosen_set, rng, out)
    out.append(text[done:])
    return "".join(out), k, len(eligible)


def _apply_char_op(text: str, i: int, free_next: bool, rng: random.Random, out: list[str]) -> int:
    """Append the perturbed text[i] to `out`; returns 1 if text[i + 1] was consumed too, else 0."""
    ch = text[i]
    op = rng.choice(CHAR_OPS)
    if op == "ocr" and free_next and text[i : i + 2] in OCR_PAIRS:
        out.append(OCR_PAIRS[text[i : i + 2]])
        return 1
    if op == "ocr" and ch in OCR_SINGLE:
        out.append(OCR_SINGLE[ch])
    elif op == "transpose" and free_next and text[i + 1] != ch:
        out.append(text[i + 1] + ch)
        return 1
    elif op == "insert":
        out.append(ch + _neighbour(ch, rng))
    elif op == "delete":
        pass
    else:  # keyboard, or an OCR/transposition that does not apply here
        out.append(_neighbour(ch, rng))
    return 0


def word_noise(text: str, ratio: float, rng: random.Random, vocab: Sequence[str]) -> tuple[str, int, int]:
    """Drop, swap with the next word, or replace about `ratio` of the words of `text`.

    Separators are kept, so untouched parts of the text are unchanged.
    Returns:
        (noisy text, operations applied, words).
    """
    parts = re.split(r"(\s+)", text)
    words = [j for j in range(0, len(parts), 2) if parts[j]]
    k = _count(ratio, len(words), rng) if ratio > 0 else 0
    if k == 0:
        return text, 0, len(words)
    chosen_pos = sorted(rng.sample(range(len(words)), k))
    chosen = set(chosen_pos)
    remaining = len(words)
    for p in chosen_pos:
        j = words[p]
        op = rng.choice(WORD_OPS)
        nxt = words[p + 1] if p + 1 < len(words) else None
        if op == "drop" and remaining > 1:
            parts[j] = ""
            if j + 1 < len(parts):
                parts[j + 1] = ""
            elif j > 0:
                parts[j - 1] = ""
            remaining -= 1
        elif op == "swap" and nxt is not None and p + 1 not in chosen and parts[nxt] != parts[j]:
            parts[j], parts[nxt] = parts[nxt], parts[j]
        else:  # replace, or a drop/swap that does not apply here
            parts[j] = _replacement(parts[j], rng, vocab)
    return "".join(parts), k, len(words)


def _replacement(word: str, rng: random.Random, vocab: Sequence[str]) -> str:
    for _ in range(8):
        cand = rng.choice(vocab) if vocab else ""
        if cand and cand != word:
            return cand
    return word + rng.choice(_LOWER)  # tiny vocabularies: still a different word


def build_vocab(texts: Sequence[str]) -> list[str]:
    """Sorted distinct lower-case alphabetic words of `texts` (the replacement vocabulary)."""
    words = {w.lower() for t in texts for w in t.split() if w.isalpha()}
    return sorted(words)


def noise_texts(
    texts: Sequence[str], char: float, word: float, seed: int, purpose: str, progress: bool = False
) -> tuple[list[str], NoiseCounts]:
    """Word noise, then character noise on the result, for each text.

    Returns:
        (noisy texts, counts); character ratios are measured on the word-noised texts.
    """
    counts = NoiseCounts()
    if char == 0 and word == 0:
        return list(texts), counts
    vocab = build_vocab(texts) if word > 0 else []
    out = []
    for i, text in enumerate(tqdm(texts, desc=f"noise {purpose}", disable=not progress, leave=False)):
        rng = row_rng(seed, purpose, i)
        text, ops, n = word_noise(text, word, rng, vocab)
        counts.word_ops += ops
        counts.words += n
        text, ops, n = char_noise(text, char, rng)
        counts.char_ops += ops
        counts.chars += n
        out.append(text)
    return out, counts


def flip_labels(labels: np.ndarray, n_labels: int, ratio: float, seed: int) -> tuple[np.ndarray, int]:
    """Flip exactly round(ratio * rows) labels, each to a uniformly drawn different label.

    Returns:
        (noisy labels, rows flipped).
    """
    labels = np.asarray(labels, dtype=np.int64)
    k = int(round(ratio * len(labels)))
    if k == 0 or n_labels < 2:
        return labels.copy(), 0
    rng = np.random.default_rng([seed, 104729])
    rows = rng.choice(len(labels), size=k, replace=False)
    noisy = labels.copy()
    noisy[rows] = (labels[rows] + rng.integers(1, n_labels, size=k)) % n_labels
    return noisy, k
