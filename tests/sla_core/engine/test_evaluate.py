"""Metrics against known values, the gate map, and the projected trainable % that pruning then delivers."""

from __future__ import annotations

import pytest
import torch

from sla_core import SLAConfig, attach
from sla_core.engine.evaluate import (
    confusion_matrix,
    gate_map,
    level_key,
    scores,
    summarize,
)
from sla_core.methods import parse_method
from tests.sla_core.tiny import tiny_backbone


@pytest.mark.parametrize(
    ("truth", "pred", "accuracy", "macro_f1"),
    [
        ([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1], 2 / 6, 0.26666666666666666),  # scikit-learn's value
        ([0, 0, 1, 1], [0, 0, 0, 0], 0.5, 1 / 3),  # a label never predicted counts with F1 = 0
        ([1, 1, 1], [1, 1, 1], 1.0, 1.0),  # labels absent from truth and prediction are left out
    ],
)
def test_accuracy_and_macro_f1_match_known_values(truth, pred, accuracy, macro_f1):
    conf = confusion_matrix(torch.tensor(pred), torch.tensor(truth), num_labels=3)
    s = scores(conf)
    assert s["accuracy"] == pytest.approx(accuracy) and s["macro_f1"] == pytest.approx(macro_f1)
    assert s["n"] == len(truth) and int(conf.sum()) == len(truth)


def test_empty_split_scores_zero():
    assert scores(torch.zeros(2, 2, dtype=torch.long)) == {"accuracy": 0.0, "macro_f1": 0.0, "n": 0}


def test_projected_trainable_percent_is_what_pruning_leaves():
    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2, "b": 3}, rank=2, pool_size=2))
    with torch.no_grad():
        model.sla_gates.log_alpha[:, ::2] = -10.0  # close every other candidate for both tasks
        model.sla_gates.log_alpha[0, 1, 0] = -10.0  # and one member for task a only (task b keeps it)
    counts = parse_method("sla").counts(model)
    projected = 100.0 * counts["kept"] / counts["backbone"]
    assert projected == pytest.approx(model.prune().trainable_percent())
    assert projected < model.trainable_percent()
    gates = gate_map(model)
    assert len(gates["open"]["a"]) == len(gates["candidates"]) // 2
    assert set(gates["decided"]) == {"a", "b"} and set(gates["probability"]["b"]) == set(gates["candidates"])
    name = gates["candidates"][1]  # two members: task a keeps one of them, task b both
    assert (gates["kept_share"]["a"][name], gates["kept_share"]["b"][name]) == (0.5, 1.0)
    assert gates["kept_share"]["a"][gates["candidates"][0]] == 0.0


def test_summary_means_over_tasks_after_pruning():
    def block(acc):
        return {
            "clean": {"accuracy": acc, "macro_f1": acc / 2, "n": 4},
            "noise0.1": {"accuracy": acc - 0.1, "macro_f1": 0.0, "n": 4},
        }

    after = {t: {"validation": block(a), "test": block(a + 0.1)} for t, a in (("x", 0.5), ("y", 0.7))}
    before = {t: {"validation": block(0.0), "test": block(0.0)} for t in ("x", "y")}
    s = summarize(after, before)
    assert s["val_accuracy"] == pytest.approx(0.6) and s["test_accuracy_mean"] == pytest.approx(0.7)
    assert s["val_macro_f1"] == pytest.approx(0.3) and s["x/test_accuracy_noise0.1"] == pytest.approx(0.5)
    assert s["y/val_accuracy_before"] == 0.0
    assert "x/val_accuracy_before" not in summarize(after)
    assert level_key(0.0) == "clean" and level_key(0.05) == "noise0.05"


def test_evaluation_shows_a_bar_over_every_batch(monkeypatch, capsys):
    """After training, evaluation advances a bar over all its batches."""
    from types import SimpleNamespace

    import sla_core.engine.evaluate as ev
    from tests.sla_core.tiny import batch

    def batches(ref, split, batch_size, task_id):
        for start in range(0, ref.counts[split], batch_size):
            n = min(batch_size, ref.counts[split] - start)
            ids, mask = batch(n=n)
            yield {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(n, dtype=torch.long),
                   "task_ids": torch.full((n,), task_id)}  # fmt: skip

    monkeypatch.setattr(ev, "eval_batches", batches)
    asked = []
    monkeypatch.setattr(ev, "noisy_eval_ref", lambda ref, *a, kind: asked.append(kind) or ref)
    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=2))
    ref = SimpleNamespace(counts={"validation": 10, "test": 7}, num_labels=2)
    out = ev.evaluate_tasks(model, {"a": ref}, None, {"a": [0.1]}, batch_size=4, progress=True, desc="eval")
    assert out["a"]["test"]["noise0.1"]["n"] == 7
    err = capsys.readouterr().err
    assert "eval" in err and "10/10" in err  # (3 + 2 batches) x (clean, noise 0.1)
    ev.evaluate_tasks(model, {"a": ref}, None, {}, batch_size=4, progress=False)
    assert capsys.readouterr().err == ""
    # Each noise kind is one more pass per level, keyed apart; the clean pass runs once.
    asked.clear()
    kinds = {"a": ["char+word", "word"]}
    out = ev.evaluate_tasks(
        model, {"a": ref}, None, {"a": [0.1]}, batch_size=4, kinds=kinds, splits=("test",)
    )
    assert set(out["a"]["test"]) == {"clean", "noise0.1", "word0.1"} and asked == ["char+word", "word"]
    assert level_key(0.2, "word") == "word0.2" and level_key(0.0, "word") == "clean"
