"""bench/pareto.py on a tiny plan: cells run through the product loop, the JSON has every field the issue
names, and the verdicts are computed from the cells (not asserted to hold: that is the benchmark's job)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench import pareto

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
FIELDS = {"method", "family", "task", "seed", "kept_percent", "trainable_percent", "budget_percent",
          "accuracy", "macro_f1", "steps", "lr", "commit"}  # fmt: skip


def test_pareto_cells_and_report(tmp_path: Path) -> None:
    plan = replace(pareto.QUICK, out=tmp_path, cache_dir=tmp_path / "cache")
    cells = [
        ("rotten_tomatoes", "lora:r=1,lr=0.001", 0),
        ("rotten_tomatoes", f"sla:budget=0.002{pareto.OURS},lr=0.001", 0),
        ("rotten_tomatoes", "random:budget=0.002,lr=0.001", 0),
    ]
    extra = ("rotten_tomatoes", "sla:budget=0.002,gate=sensitivity_per_param,lr=0.001", 0)  # outside the grid
    pareto.run_cells(plan, [*cells, extra])
    path = pareto.report(plan)
    data = json.loads(path.read_text())
    rows = {r["family"]: r for r in data["cells"]}
    assert set(rows) == {"lora", "sla", "random"} and all(FIELDS <= set(r) for r in rows.values())
    assert [r["method"] for r in data["sweep"]] == [extra[1]]  # reported apart, not as ours
    assert rows["sla"]["budget_percent"] == pytest.approx(0.2) and rows["lora"]["budget_percent"] is None
    assert rows["sla"]["kept_percent"] <= 0.2 and rows["random"]["kept_percent"] <= 0.2
    assert rows["sla"]["steps"] == plan.steps and rows["lora"]["lr"] == pytest.approx(1e-3)
    budget = data["verdicts"]["budgets"]["0.2"]
    assert (
        budget["random"] == rows["random"]["accuracy"] and budget["lora_frontier"] == rows["lora"]["accuracy"]
    )
    diff = rows["sla"]["accuracy"] - rows["random"]["accuracy"]
    assert budget["vs_random_by_seed"] == {"0": pytest.approx(diff)}  # paired by seed
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    structure = data["structure"]["rotten_tomatoes"]  # where each budget went, from the runs' pruned.json
    assert list(structure) == ["sla", "random"] and structure["sla"]["0.2"]["seeds"] == 1
    shares = structure["random"]["0.2"]["kept_share"]
    assert all(0.0 <= x <= 1.0 for x in shares.values()) and sum(shares.values()) > 0
    assert (tmp_path / "pareto_structure.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "pareto.md").read_text()
    assert f"| 0.2 | {rows['sla']['accuracy']:.1f} (1) |" in md and "`random:budget=0.002,lr=0.001`" in md
    assert f"| {diff:+.1f} ({int(diff > 0)} of 1 above) |" in md
    assert md.index("Cells outside the grid") < md.index(f"| `{extra[1]}` | 1 |")
    assert "![kept structure](pareto_structure.png)" in md and "| random | 0.2 | 1 | " in md
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## 1. Main table\n\ntext\n\n## 3. λ and budget\n\nmore\n")
    for _ in range(2):  # inserted before section 3 once, then replaced in place
        pareto.refresh_results_section(tmp_path, results)
    text = results.read_text()
    assert text.startswith("# Results\n\n## 1. Main table\n\ntext\n\n## 2. Accuracy against kept parameters")
    assert text.count("## 2.") == 1 and "(pareto.png)" in text
    assert text.endswith("|\n\n## 3. λ and budget\n\nmore\n")
    pareto.run_cells(plan, cells)  # finished cells are not rerun
    assert len(list((tmp_path / "pareto" / "rotten_tomatoes" / "cells").glob("*.json"))) == 4
    (tmp_path / "pareto" / "rotten_tomatoes" / "runs" / "lora-r=2_lr=0.001-s0").mkdir()  # an interrupted one
    todo = [("rotten_tomatoes", "lora:r=2,lr=0.001", 0), ("rotten_tomatoes", "lora:r=4,lr=0.001", 0)]
    lines, summary = pareto.cell_status(plan, [cells[0], *todo])
    assert [line.rsplit("  ", 1)[1] for line in lines] == ["done", "started", "todo"]
    assert summary.startswith("3 cells: 1 done, 1 started, 1 todo; about ")
    assert " h of training left" in summary


def test_the_grid_covers_the_issue_sizes() -> None:
    methods = pareto.methods()
    assert sum(m.startswith("lora:") for m in methods) == 10  # r in 1..16, on q,v and on every linear layer
    assert [m for m in methods if m.startswith("sla:")] == [
        f"sla:budget={b:g}{pareto.OURS}" for b in pareto.BUDGETS
    ]
    assert len([m for m in methods if m.startswith("random:")]) == 4 and "full_ft" in methods


def test_extra_variants_run_at_the_seeds_asked_and_a_bad_one_is_refused_before_any_cell(
    capsys, tmp_path: Path
) -> None:
    spec = "sla:budget=0.002,gate=sensitivity_per_param,lr=0.003"
    assert pareto.main(["--plan", "--out", str(tmp_path), "--extra", spec, "--seeds", "0", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"rotten_tomatoes {spec} 0  todo",
        f"rotten_tomatoes {spec} 2  todo",
        "2 cells: 0 done, 0 started, 2 todo; no finished cell yet to estimate the time from",
    ]
    with pytest.raises(SystemExit):
        pareto.main(["--extra", "sla:budgt=0.002"])
    assert "--extra: method 'sla:budgt=0.002'" in capsys.readouterr().err


def test_a_second_task_gets_its_own_table_and_panel(tmp_path: Path) -> None:
    """Rendering only: rows of two tasks (as `collect` makes them) give tweets its own tables and plot panel;
    the targets stay Rotten Tomatoes'."""
    from PIL import Image

    def row(task: str, method: str, family: str, kept: float, acc: float, budget: float | None = None):
        return {"task": task, "method": method, "family": family, "seed": 0, "kept_percent": kept,
                "accuracy": acc, "budget_percent": budget, "grid": True}  # fmt: skip

    rows = [
        row(task, "lora:r=1,lr=0.003", "lora", 0.05, acc)
        for task, acc in (("rotten_tomatoes", 82.0), ("tweets", 76.0))
    ] + [row("tweets", "sla:budget=0.001,lr=0.003", "sla", 0.1, 77.0, budget=0.1)]
    payload = {"plan": {"steps": 4, "batch_size": 8, "seeds": {"rotten_tomatoes": [0], "tweets": [0]}},
               "cells": rows, "verdicts": pareto.verdicts(rows),
               "other_tasks": {"tweets": pareto.verdicts(rows, "tweets")}}  # fmt: skip
    md = pareto.markdown(payload)
    tweets = md[md.index("### tweets") :]
    assert "`sla:budget=0.001,lr=0.003`" in tweets and "| 0.1 | 77.0 (1) | 76.0 (1) | +1.00 |" in tweets
    assert "`sla:budget=0.001,lr=0.003`" not in md[: md.index("### tweets")]
    pareto.plot(rows, tmp_path / "p.png")
    wide = Image.open(tmp_path / "p.png").size[0]
    pareto.plot(rows[:1], tmp_path / "one.png")
    assert wide == 2 * Image.open(tmp_path / "one.png").size[0]  # one panel per task
