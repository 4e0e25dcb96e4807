"""The evidence harness on tiny real data: every method builds, trains two steps, evaluates and caches a cell;
trainable counts are what each method promises; the report renders from partial results."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import grid, report
from bench.harness import Cell, run_cell

RT = ("rotten_tomatoes",)
SINGLE = ("full_ft", "lora_qv_r8", "lora_matched", "prefix", "houlsby", "sla_single")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers/PEFT deprecations
FIELDS = ("key", "cell", "machine", "data", "params", "train", "results", "eval_s", "total_s")


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> grid.Plan:
    out = tmp_path_factory.mktemp("results")
    return grid.Plan(
        steps=2, large_steps=2, batch_size=4, max_length=16, max_train_examples=32, max_eval_examples=16,
        seeds=(0,), sweep_seeds=(0,), large_seeds=(0,), large_backbones=(), out=out,
        report=out / "RESULTS.md", cache_dir=out / "cache", quick=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cells(plan: grid.Plan) -> dict[str, dict[str, Any]]:
    """One tiny cell per method (the multi-task one on two tasks), run once for the module."""
    out = {m: run_cell(plan.cell(m, RT, 0), plan.cells_dir, plan.cache_dir) for m in SINGLE}
    multi = Cell("sla_multi", tasks=("rotten_tomatoes", "bbc_news"), steps=2, batch_size=4, max_length=16,
                 max_train_examples=32, max_eval_examples=16)  # fmt: skip
    out["sla_multi"] = run_cell(multi, plan.cells_dir, plan.cache_dir)
    return out


@pytest.mark.parametrize("method", [*SINGLE, "sla_multi"])
def test_cell_has_every_field(cells: dict[str, dict[str, Any]], method: str) -> None:
    r = cells[method]
    assert all(k in r for k in FIELDS), sorted(r)
    assert r["cell"]["method"] == method and r["cell"]["steps"] == 2
    assert r["train"]["step_s"] > 0 and r["train"]["loss_first"] == r["train"]["loss_first"]  # not NaN
    for task in r["cell"]["tasks"]:
        clean = r["results"][task]["clean"]
        assert 0.0 <= clean["accuracy"] <= 1.0 and 0.0 <= clean["macro_f1"] <= 1.0 and clean["n"] == 16
    p = r["params"]
    assert 0 < p["kept"] <= p["trainable"] and p["backbone"] == 22_713_216
    assert p["trainable_percent"] == pytest.approx(100 * p["trainable"] / p["backbone"])


def test_cell_file_is_the_returned_json(cells: dict[str, dict[str, Any]], plan: grid.Plan) -> None:
    for r in cells.values():
        path = Path(plan.cells_dir) / f"{r['key']}.json"
        assert json.loads(path.read_text()) == json.loads(json.dumps(r))


def test_trainable_and_kept_counts(cells: dict[str, dict[str, Any]]) -> None:
    t = {m: r["params"]["trainable"] for m, r in cells.items()}
    kept = {m: r["params"]["kept_percent"] for m, r in cells.items()}
    assert t["full_ft"] == 22_713_216 + 385 * 2
    assert t["lora_qv_r8"] == 8 * 12 * (384 + 384) + 385 * 2  # q and v of 6 layers, A and B, plus the head
    assert t["prefix"] == 20 * 6 * 2 * 384 + 385 * 2
    # Ours trains every candidate (8 rank-1 units at each of 36 linear layers) and ships the 0.2 % budget;
    # LoRA "at ours' kept size" takes the rank on q,v whose export is closest to it.
    assert t["sla_single"] == 8 * 6 * (4 * 768 + 2 * (384 + 1536)) + 385 * 2
    assert 0.95 * 0.2 <= kept["sla_single"] <= 0.2
    assert cells["lora_matched"]["info"]["lora_rank"] == 5 and abs(kept["lora_matched"] / 0.2 - 1) <= 0.06
    assert 0.95 * 0.4 <= kept["sla_multi"] <= 0.4  # two tasks: the two single-task budgets together


def test_noise_levels_of_both_kinds_are_evaluated_for_the_noise_methods(
    cells: dict[str, dict[str, Any]],
) -> None:
    levels = set(cells["sla_single"]["results"]["rotten_tomatoes"])
    assert levels == {"clean"} | {f"{k}{p:g}" for k in ("noise", "word") for p in (0.05, 0.1, 0.15, 0.2)}
    assert set(cells["houlsby"]["results"]["rotten_tomatoes"]) == {"clean"}


def test_a_noise_trained_cell_trains_on_its_kind_and_tests_at_its_level(plan: grid.Plan) -> None:
    cell = grid.noise_cell(plan, "lora_qv_r8", "word", 0.1, 0)
    r = run_cell(cell, plan.cells_dir, plan.cache_dir)
    spec = r["engine"]["config"]["tasks"][0]
    assert spec["train_noise"]["char"] == 0.0 and spec["train_noise"]["word"] == 0.1
    assert set(r["results"]["rotten_tomatoes"]) == {"clean", "word0.1"}
    measured = r["data"]["rotten_tomatoes"]["train_noise_measured"]
    assert measured["char"] == 0.0 and measured["word"] > 0


def test_houlsby_has_no_gates(cells: dict[str, dict[str, Any]]) -> None:
    s = cells["houlsby"]["structure"]
    assert s["kept_counts"]["gates"] == 0
    assert all(name.endswith(".seq") for name in s["candidates"]) and len(s["candidates"]) == 12
    assert all(v == 1.0 for task in s["decided_gates"] for c in task for v in c)
    assert cells["houlsby"]["params"]["kept"] == cells["houlsby"]["params"]["trainable"]


def test_ours_prunes_exactly_and_records_the_structure(cells: dict[str, dict[str, Any]]) -> None:
    for method in ("sla_single", "sla_multi"):
        r = cells[method]
        s = r["structure"]
        assert s["prune_max_logit_change"] <= 1e-4
        assert len(s["decided_gates"]) == len(r["cell"]["tasks"])
        assert len(s["decided_gates"][0]) == len(s["candidates"]) == 36  # 6 linear layers x 6 blocks
        assert all(len(units) == 8 for units in s["decided_gates"][0])  # 8 rank units each
        assert set(r["kept_share"]) == set(r["cell"]["tasks"])
    assert r["engine"]["config"]["sla"]["budget"] == pytest.approx(0.004)


def test_cached_cells_are_not_rerun(cells, plan: grid.Plan, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached cell was trained again")

    monkeypatch.setattr("sla_core.engine.loop.train", boom)
    again = run_cell(plan.cell("sla_single", RT, 0), plan.cells_dir, plan.cache_dir)
    assert again == json.loads(json.dumps(cells["sla_single"]))


def test_cell_keys_follow_every_knob(plan: grid.Plan) -> None:
    base = plan.cell("sla_single")
    assert base.key() == plan.cell("sla_single").key()
    assert base.key() != plan.cell("sla_single", lambda_sparse=5.0).key()
    assert base.key() != plan.cell("sla_single", seed=1).key()
    assert base.key() != plan.cell("sla_single", noise_kind="word", train_noise=0.1).key()
    # The noise section's 'trained clean' rows and the multi-task section read the main table's cells.
    assert grid.noise_cell(plan, "sla_single", "word", 0.0, 0).key() == base.key()
    assert base.key() in {c.key() for c in grid.section_cells(5, plan)}
    assert base.key() not in {c.key() for c in grid.section_cells(3, plan)}  # λ mode is another recipe
    with pytest.raises(ValueError, match="trains one task"):
        Cell("sla_single", tasks=("rotten_tomatoes", "tweets"))
    with pytest.raises(ValueError, match="noise kind 'typo'"):
        Cell("sla_single", noise_kind="typo")


def test_report_renders_from_partial_results(cells, plan: grid.Plan) -> None:
    path = report.write_report(plan, {"x-key": "RuntimeError: boom"})
    text = path.read_text()
    headings = ("## 1. Main table", "## 2. Accuracy against kept parameters", "## 3. λ and budget",
                "## 4. Noise", "## 5. Multi-task", "## 6. A decoder", "## 7. Speed and memory",
                "## 8. Conclusions")  # fmt: skip
    assert all(h in text for h in headings)
    acc = 100 * cells["sla_single"]["results"]["rotten_tomatoes"]["clean"]["accuracy"]
    assert f"| ours, single task | {acc:.1f} |" in text
    assert "not measured" in text and "RuntimeError: boom" in text
    # Each claim shows the archived report's verdict beside its own; a claim new here says so.
    row = next(line for line in text.splitlines() if line.startswith("| pruning is exact"))
    assert row.endswith("| held |") and "**held**" in row
    assert "| not in the old report |" in text or "not measured" in text
    assert json.loads((plan.out / "results.json").read_text())["main"]["sla_single"]["kept"]


def test_the_archived_verdicts_are_read_from_its_conclusions_table(tmp_path: Path) -> None:
    old = tmp_path / "RESULTS.md"
    table = "| claim | measured | verdict |\n|---|---|---|\n| a claim | 1 vs 2 | **not held** |\n"
    old.write_text(f"## 7. Conclusions\n\n{table}\n## 8. Next\n| other | x | **held** |\n")
    assert report.v1_verdicts(old) == {"a claim": ("1 vs 2", "not held")}
    assert set(report.V1.values()) <= set(report.v1_verdicts())  # every "before" names a real old row


def test_a_cell_is_claimed_by_one_process_and_a_dead_holder_releases_it(tmp_path: Path) -> None:
    cell = Cell("sla_single", tasks=RT, steps=2)
    lock = grid.claim(cell, tmp_path)
    assert lock is not None and lock.is_locked
    assert grid.claim(cell, tmp_path) is None  # held (here by this process, through another handle)
    lock.release()
    hold = "import sys, time, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)"  # noqa: E501
    holder = subprocess.Popen([sys.executable, "-c", hold, lock.lock_file], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert grid.claim(cell, tmp_path) is None  # a live process holds it
    finally:
        holder.kill()
        holder.wait()
    again = grid.claim(cell, tmp_path)  # the process died: the operating system released its lock
    assert again is not None
    again.release()


def test_the_grid_runs_missing_cells_once_and_records_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = grid.Plan(seeds=(0,), sweep_seeds=(0,), large_backbones=(), out=tmp_path, cache_dir=tmp_path)
    cells = grid.unique(grid.section_cells(3, plan))  # the λ sweep: one cell per λ
    ran: list[str] = []

    def fake_run_cell(cell: Cell, cells_dir: Path, cache_dir: Path) -> dict[str, Any]:
        ran.append(cell.key())
        if cell.lambda_sparse == 5.0:
            raise RuntimeError("boom")
        (cells_dir / f"{cell.key()}.json").write_text(json.dumps({"key": cell.key()}))
        return {"key": cell.key()}

    monkeypatch.setattr(grid, "run_cell", fake_run_cell)
    held = grid.claim(cells[0], plan.cells_dir)  # another process is running this one
    assert held is not None
    log: list[str] = []
    errors = grid.run_grid(plan, [3], log=log.append)
    held.release()
    assert cells[0].key() not in ran and any("run by another process" in line for line in log)
    assert len(ran) == len(cells) - 1
    failed = next(c.key() for c in cells if c.lambda_sparse == 5.0)
    assert errors == {failed: "RuntimeError: boom"} == grid.read_errors(plan)
    assert grid.run_grid(plan, [3], log=log.append) == errors and ran.count(failed) == 2  # retried, once more


def test_a_cell_and_sla_train_give_the_same_adapters(cells, tmp_path: Path) -> None:
    """A cell is `sla train` on the cell's config: same seed, same loop, the same pruned tensors."""
    import yaml
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from flows.cli import app

    r = cells["sla_single"]
    config = {**r["engine"]["config"], "output_dir": str(tmp_path / "run")}
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = CliRunner().invoke(app, ["train", "--config", str(path), "--no-evaluate"])
    assert out.exit_code == 0, out.output
    name = "sla_adapter_model.safetensors"
    ours = load_file(str(Path(r["engine"]["run_dir"]) / "adapters" / name))
    theirs = load_file(str(tmp_path / "run" / "adapters" / name))
    assert ours.keys() == theirs.keys() and ours
    assert all(bool((ours[k] == theirs[k]).all()) for k in ours)
    assert r["engine"]["method"] == "sla"


def test_a_cell_stopped_by_sigterm_resumes_from_its_checkpoint_and_ends_where_an_unbroken_one_does(
    plan: grid.Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    from safetensors.torch import load_file

    import sla_core.engine.loop as loop
    from sla_core.engine.result import TrainingInterrupted

    cell = plan.cell("sla_single", RT, 0, steps=4, eval_noise=(), eval_kinds=("char+word",))
    unbroken = run_cell(dataclasses.replace(cell, seed=1), plan.cells_dir, plan.cache_dir)
    real = loop.train

    def stopped_early(*args: Any, **kwargs: Any) -> Any:
        def on_step(step: int) -> None:
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        return real(*args, **kwargs, on_step=on_step)

    seed1 = dataclasses.replace(cell, seed=1, lr=cell.learning_rate)  # same run, another cell key
    assert seed1.key() != unbroken["key"]
    monkeypatch.setattr(loop, "train", stopped_early)
    with pytest.raises(TrainingInterrupted, match=r"after step \d") as stop:
        run_cell(seed1, plan.cells_dir, plan.cache_dir)
    step = int(str(stop.value).split("after step ")[1].split(";")[0])
    monkeypatch.setattr(loop, "train", real)
    resumed = run_cell(seed1, plan.cells_dir, plan.cache_dir)
    assert resumed["train"]["resumed_from_step"] == step < 4
    assert unbroken["train"]["resumed_from_step"] is None
    name = "sla_adapter_model.safetensors"
    a = load_file(str(Path(unbroken["engine"]["run_dir"]) / "adapters" / name))
    b = load_file(str(Path(resumed["engine"]["run_dir"]) / "adapters" / name))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
