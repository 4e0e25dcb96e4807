"""Noise: measured ratios on the shipped data, determinism, label flips, evaluation noise levels."""

from __future__ import annotations

import copy
import difflib
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sla_core.data import (
    ConfigError,
    DataError,
    NoiseSpec,
    TaskSpec,
    noisy_eval_ref,
    noisy_eval_split,
    prepare_eval_levels,
    prepare_task,
)
from sla_core.data.builtin import load_builtin
from sla_core.data.noise import KEYBOARD, char_noise, flip_labels, noise_texts, word_noise


def _osa_distance(a: str, b: str) -> int:
    """Optimal-string-alignment edit distance (substitution, insertion, deletion, adjacent transposition)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            v = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                v = min(v, prev2[j - 2] + 1)
            cur[j] = v
        prev2, prev = prev, cur
    return prev[-1]


@pytest.mark.parametrize("name", ["tweets", "bbc_news"])
def test_measured_ratio_within_one_point_on_shipped_data(name: str) -> None:
    texts = load_builtin(name)[0].text
    noisy, counts = noise_texts(texts, char=0.1, word=0.15, seed=0, purpose="train/text")
    measured = counts.measured()
    assert abs(measured["char"] - 0.1) < 0.01 and abs(measured["word"] - 0.15) < 0.01
    assert counts.words == sum(len(t.split()) for t in texts)
    assert sum(a != b for a, b in zip(texts, noisy, strict=True)) > 0.5 * len(texts)


def test_measured_counts_agree_with_an_independent_diff(rt_rows: list) -> None:
    texts = [r["text"] for r in rt_rows[:120]]
    noisy, counts = noise_texts(texts, char=0.1, word=0.0, seed=5, purpose="x")
    distance = sum(_osa_distance(a, b) for a, b in zip(texts, noisy, strict=True))
    # m->rn and friends cost 2 edits, neighbouring operations can share one: close, not equal
    assert 0.9 < distance / counts.char_ops < 1.15
    noisy, counts = noise_texts(texts, char=0.0, word=0.2, seed=5, purpose="x")
    changed = 0
    for a, b in zip(texts, noisy, strict=True):
        ops = difflib.SequenceMatcher(a=a.split(), b=b.split(), autojunk=False).get_opcodes()
        changed += sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")
    assert counts.word_ops <= changed <= 1.5 * counts.word_ops  # a swap moves two words


def test_prepared_train_noise_is_measured_and_stored(tokenizer: Any, shared_cache: Path) -> None:
    noise = NoiseSpec(char=0.05, word=0.1, label=0.2, seed=3)
    spec = TaskSpec(name="rotten_tomatoes", train_noise=noise, max_length=32)
    ref = prepare_task(spec, tokenizer, shared_cache, progress=False)
    measured = ref.noise["train"]["measured"]
    assert abs(measured["char"] - 0.05) < 0.01 and abs(measured["word"] - 0.1) < 0.01
    assert abs(measured["label"] - 0.2) < 0.01
    train = ref.load("train")
    labels, clean = np.array(train["labels"]), np.array(train["clean_labels"])
    assert (labels != clean).mean() == pytest.approx(measured["label"])
    assert ref.noise["test"]["measured"] == {"char": 0.0, "word": 0.0, "label": 0.0}
    clean_ref = prepare_task(
        TaskSpec(name="rotten_tomatoes", max_length=32), tokenizer, shared_cache, progress=False
    )
    assert clean_ref.load("test")["text"] == ref.load("test")["text"]  # evaluation data left clean
    changed = sum(a != b for a, b in zip(clean_ref.load("train")["text"], train["text"], strict=True))
    assert changed > 0.5 * ref.counts["train"]


def test_noise_is_deterministic_for_a_seed() -> None:
    texts = ["The modern clerk counted 10 coins in a wide room."] * 20
    a, _ = noise_texts(texts, 0.2, 0.2, seed=1, purpose="t")
    b, _ = noise_texts(texts, 0.2, 0.2, seed=1, purpose="t")
    c, _ = noise_texts(texts, 0.2, 0.2, seed=2, purpose="t")
    assert a == b and a != c
    assert len(set(a)) > 10  # rows get their own draws


def test_char_operations_change_text_and_use_keyboard_neighbours() -> None:
    assert set(KEYBOARD["f"]) == set("drtgvc") and set(KEYBOARD["q"]) == set("wa12")
    text = "modern burn 0 clue"
    outs = set()
    for seed in range(600):
        out, ops, n = char_noise(text, 1 / 15, random.Random(seed))
        assert n == 15 and ops == 1 and out != text
        outs.add(out)
    assert {"modem burn 0 clue", "modern bum 0 clue", "modern burn O clue", "modern burn 0 due"} <= outs
    assert {"omdern burn 0 clue", "odern burn 0 clue"} <= outs  # transposition, deletion


def test_word_operations() -> None:
    text = "one two three four"
    seen = set()
    for seed in range(100):
        out, ops, n = word_noise(text, 0.25, random.Random(seed), ["alpha"])
        assert n == 4 and ops == 1 and out != text
        seen.add(out)
    assert {"two one three four", "two three four", "alpha two three four"} <= seen
    for seed in range(10):  # a lone word is never dropped (or swapped): it is replaced
        assert word_noise("alone", 1.0, random.Random(seed), ["alpha"])[0] == "alpha"


def test_flip_labels_exact_count_and_always_different() -> None:
    labels = np.arange(1000) % 3
    noisy, k = flip_labels(labels, 3, 0.15, seed=4)
    assert k == 150 and (noisy != labels).sum() == 150 and set(noisy) <= {0, 1, 2}
    again, _ = flip_labels(labels, 3, 0.15, seed=4)
    assert (again == noisy).all()


def test_eval_noise_applies_to_evaluation_splits_only(tokenizer: Any, shared_cache: Path) -> None:
    spec = TaskSpec(name="tweets", max_train_examples=200, max_eval_examples=400, max_length=32)
    ref = prepare_task(spec, tokenizer, shared_cache, eval_noise=NoiseSpec(char=0.1, seed=1), progress=False)
    for split in ("validation", "test"):
        assert abs(ref.noise[split]["measured"]["char"] - 0.1) < 0.01
    assert ref.noise["train"]["measured"]["char"] == 0.0
    clean = prepare_task(spec, tokenizer, shared_cache, progress=False)
    assert clean.fingerprint != ref.fingerprint
    assert clean.load("train")["text"] == ref.load("train")["text"]
    with pytest.raises(ConfigError, match="label noise is for training data only"):
        prepare_task(spec, tokenizer, shared_cache, eval_noise=NoiseSpec(label=0.1), progress=False)


def test_noisy_eval_levels_from_one_clean_set(tokenizer: Any, shared_cache: Path) -> None:
    ref = prepare_task(
        TaskSpec(name="rotten_tomatoes", max_length=32), tokenizer, shared_cache, progress=False
    )
    levels = prepare_eval_levels(ref, tokenizer, [0.0, 0.1, 0.2], split="test", seed=0)
    assert levels[0.0].load("test")["text"] == ref.load("test")["text"]
    for level, nref in levels.items():
        assert nref.counts == {"test": ref.counts["test"]} and nref.labels == ref.labels
        measured = nref.noise["test"]["measured"]
        assert abs(measured["char"] - level) < 0.01 and abs(measured["word"] - level) < 0.01
        assert nref.load("test")["labels"] == ref.load("test")["labels"]
    again = noisy_eval_ref(ref, "test", 0.1, tokenizer, seed=0)
    assert again == levels[0.1]
    assert noisy_eval_split(ref, "test", 0.1, tokenizer)["text"] == levels[0.1].load("test")["text"]
    assert noisy_eval_split(ref, "test", 0.1, tokenizer, seed=1)["text"] != levels[0.1].load("test")["text"]
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["[NOISY]"])
    with pytest.raises(DataError, match="tokenizer differs"):
        noisy_eval_ref(ref, "test", 0.1, other)
    # Word noise only: the same rate of word operations, no character edits, cached apart.
    words = noisy_eval_ref(ref, "test", 0.1, tokenizer, seed=0, kind="word")
    measured = words.noise["test"]["measured"]
    assert measured["char"] == 0.0 and abs(measured["word"] - 0.1) < 0.01
    assert words.path != levels[0.1].path and words.load("test")["labels"] == ref.load("test")["labels"]
    with pytest.raises(ValueError, match="noise kind 'typo'"):
        NoiseSpec.of_kind("typo", 0.1)
