"""Multi-task batches: shapes and padding, sampling rates, determinism, exact resume, sharding."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sla_core.data import DatasetRef, TaskSpec, prepare_tasks
from sla_core.data.sampling import MultiTaskBatches, eval_batches

ORDER = ["rotten_tomatoes", "tweets", "bbc_news"]


def _rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, tuple[int, ...]]]:
    """(task id, unpadded token ids) per row."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        out.append((int(batch["task_ids"][b]), tuple(batch["input_ids"][b, :n].tolist())))
    return out


def test_batches_are_padded_tensors_with_task_ids(small_builtin_refs: dict) -> None:
    loader = MultiTaskBatches(small_builtin_refs, batch_size=8, task_order=ORDER, seed=0)
    assert len(loader) == int(np.ceil(900 / 8))
    batches = list(loader)
    assert len(batches) == len(loader) and loader.state_dict()["epoch"] == 1
    b = batches[0]
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[0] == 8
    assert b["labels"].shape == b["task_ids"].shape == (8,) and b["input_ids"].dtype == torch.long
    width = b["input_ids"].shape[1]
    assert int(b["attention_mask"].sum(1).max()) == width  # padded to the longest row of this batch
    assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()  # MiniLM pad id
    assert any(len(set(x["task_ids"].tolist())) > 1 for x in batches)  # tasks mix inside batches
    for x in batches:  # labels stay within each task's label set
        for t, name in enumerate(ORDER):
            assert (x["labels"][x["task_ids"] == t] < small_builtin_refs[name].num_labels).all()


def test_proportional_epoch_sees_every_row(small_builtin_refs: dict) -> None:
    loader = MultiTaskBatches(small_builtin_refs, batch_size=10, task_order=ORDER, seed=3)
    tasks, rows = loader.plan(0)
    assert len(tasks) == 900 and Counter(tasks.tolist()) == {0: 300, 1: 300, 2: 300}
    for t in range(3):
        assert sorted(rows[tasks == t].tolist()) == list(range(300))


@pytest.fixture(scope="module")
def unequal_refs(tokenizer: Any, shared_cache: Path) -> dict[str, DatasetRef]:
    specs = [
        TaskSpec(name="rotten_tomatoes", max_train_examples=400, max_eval_examples=20, max_length=16),
        TaskSpec(name="tweets", max_train_examples=100, max_eval_examples=20, max_length=16),
    ]
    return prepare_tasks(specs, tokenizer, shared_cache, progress=False)


def test_proportional_and_temperature_rates(unequal_refs: dict) -> None:
    prop = MultiTaskBatches(unequal_refs, batch_size=10, sampling="proportional")
    assert prop.probs == pytest.approx([0.8, 0.2])
    temp = MultiTaskBatches(unequal_refs, batch_size=10, sampling="temperature", temperature=2.0)
    assert temp.probs == pytest.approx([20 / 30, 10 / 30])  # sizes ** (1 / 2)
    assert MultiTaskBatches(unequal_refs, sampling="temperature", temperature=1e9).probs == pytest.approx(
        [0.5, 0.5]
    )
    tasks, rows = temp.plan(0)
    assert len(temp) == 50 and Counter(tasks.tolist()) == {0: 333, 1: 167}
    assert set(rows[tasks == 1].tolist()) == set(range(100))  # the small task is upsampled: it cycles
    assert len(set(rows[tasks == 0].tolist())) == 333  # the big one is downsampled without repeats


def test_deterministic_and_seed_dependent(small_builtin_refs: dict) -> None:
    a = [_rows(b) for b in MultiTaskBatches(small_builtin_refs, batch_size=16, seed=7)]
    b = [_rows(b) for b in MultiTaskBatches(small_builtin_refs, batch_size=16, seed=7)]
    c = [_rows(b) for b in MultiTaskBatches(small_builtin_refs, batch_size=16, seed=8)]
    assert a == b and a != c
    loader = MultiTaskBatches(small_builtin_refs, batch_size=16, seed=7)
    first, second = [_rows(x) for x in loader], [_rows(x) for x in loader]
    assert first == a and second != first  # epochs reshuffle


def test_resume_mid_epoch_is_exact(small_builtin_refs: dict) -> None:
    full = MultiTaskBatches(small_builtin_refs, batch_size=16, seed=1)
    reference = [_rows(b) for _ in range(2) for b in full]
    run = MultiTaskBatches(small_builtin_refs, batch_size=16, seed=1)
    it = iter(run)
    for _ in range(20):
        next(it)
    state = run.state_dict()
    assert state["step"] == 20
    resumed = MultiTaskBatches(small_builtin_refs, batch_size=16, seed=1)
    resumed.load_state_dict(state)
    rest = [_rows(b) for b in resumed] + [_rows(b) for b in resumed]
    assert rest == reference[20:]
    skipped = MultiTaskBatches(small_builtin_refs, batch_size=16, seed=1)
    skipped.skip(len(skipped) + 5)
    assert [_rows(b) for b in skipped][0] == reference[len(full) + 5]
    with pytest.raises(ValueError, match="another seed"):
        MultiTaskBatches(small_builtin_refs, batch_size=16, seed=2).load_state_dict(state)


@pytest.mark.parametrize("mix", [True, False])
def test_two_ranks_split_each_global_batch(small_builtin_refs: dict, mix: bool) -> None:
    one = list(MultiTaskBatches(small_builtin_refs, batch_size=8, seed=4, mix=mix))
    r0 = list(MultiTaskBatches(small_builtin_refs, batch_size=4, seed=4, mix=mix, rank=0, world_size=2))
    r1 = list(MultiTaskBatches(small_builtin_refs, batch_size=4, seed=4, mix=mix, rank=1, world_size=2))
    assert len(one) == len(r0) == len(r1)
    for g, a, b in zip(one, r0, r1, strict=True):
        assert _rows(g) == _rows(a) + _rows(b)
        assert torch.equal(g["labels"], torch.cat([a["labels"], b["labels"]]))
    if not mix:
        assert all(len(set(b["task_ids"].tolist())) == 1 for b in one)


def test_eval_batches_in_order(small_builtin_refs: dict) -> None:
    ref = small_builtin_refs["tweets"]
    batches = list(eval_batches(ref, "test", batch_size=16, task_id=1))
    assert [b["labels"].shape[0] for b in batches] == [16, 16, 16, 12]
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert labels == ref.load("test")["labels"]
    assert all((b["task_ids"] == 1).all() for b in batches)
    first = ref.load("test")[0]["input_ids"]
    assert batches[0]["input_ids"][0, : len(first)].tolist() == first


def test_bad_arguments(small_builtin_refs: dict) -> None:
    with pytest.raises(ValueError, match="must name exactly the tasks"):
        MultiTaskBatches(small_builtin_refs, task_order=["tweets"])
    with pytest.raises(ValueError, match="rank"):
        MultiTaskBatches(small_builtin_refs, rank=2, world_size=2)
