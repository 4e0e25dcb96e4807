"""`sla run`'s final table: test accuracy before and after pruning, macro-F1, and the noisy accuracies, read
from the evaluation's own summary keys (`summarize`, which the evaluate stage writes)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from flows.commands.pipeline import print_summary, summary_rows
from flows.pipeline import PipelineResult
from flows.stages import Registration
from sla_core.engine.evaluate import summarize


def _scores(accuracy: float, macro_f1: float) -> dict[str, float]:
    return {"accuracy": accuracy, "macro_f1": macro_f1}


def _result() -> PipelineResult:
    """A finished run's result with what the evaluate stage measures: `reviews` evaluated before and after
    pruning; `news` after only (a set evaluated without its unpruned one)."""
    after = {
        "reviews": {
            "validation": {"clean": _scores(0.70, 0.69)},
            "test": {"clean": _scores(0.815, 0.799), "noise0.1": _scores(0.75, 0.74)},
        },
        "news": {"validation": {"clean": _scores(0.9, 0.9)}, "test": {"clean": _scores(0.96, 0.955)}},
    }
    before = {
        "reviews": {"validation": {"clean": _scores(0.71, 0.7)}, "test": {"clean": _scores(0.80, 0.79)}},
    }
    summary = summarize({"reviews": after["reviews"]}, before)
    summary.update(summarize({"news": after["news"]}))
    accuracy = {t: {lv: s["accuracy"] for lv, s in after[t]["test"].items()} for t in after}
    registration = Registration(
        "m", "1", True, True, "1", "champion", {"reason": "first"}, "models:/m@champion"
    )
    overhead = {k: 0.0 for k in ("prefect_seconds", "mlflow_seconds", "ray_seconds", "work_seconds")}
    return PipelineResult(
        "p1", "runs/p1", "r1", "sqlite:///x.db", accuracy, 1.0, 0.5, registration, None, {}, overhead, summary
    )


def test_the_table_has_accuracy_before_and_after_pruning_and_macro_f1() -> None:
    headers, rows = summary_rows(_result())
    assert headers == ["task", "accuracy before pruning", "accuracy after pruning", "macro-F1", "noise0.1"]
    assert rows == [
        ["reviews", "80.0%", "81.5%", "79.9%", "75.0%"],
        ["news", "-", "96.0%", "95.5%", "-"],
    ]


def test_sla_run_prints_that_table(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    from flows import settings

    monkeypatch.setenv("COLUMNS", "200")  # one line per row and header
    print_summary(_result(), settings.current(), 10.0, 1.0)
    out = capsys.readouterr().out
    assert re.search(
        r"task\W+accuracy before pruning\W+accuracy after pruning\W+macro-F1\W+noise0\.1", out
    ), out
    assert re.search(r"reviews\W+80\.0%\W+81\.5%\W+79\.9%\W+75\.0%", out), out
    assert re.search(r"news\W+-\W+96\.0%\W+95\.5%\W+-", out), out
