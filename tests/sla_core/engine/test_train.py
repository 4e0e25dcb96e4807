"""One-process training in this interpreter: export layout, metrics.json, resume rules, the NaN stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sla_core import load_adapters
from sla_core.backbones import load_backbone
from sla_core.engine import NonFiniteLossError, TrainResult, run_experiment
from sla_core.engine.checkpoint import CheckpointError, latest_checkpoint
from sla_core.engine.result import EvaluationReport, PrunedAdapterSet
from sla_core.engine.stages import prune
from sla_core.experiment import load_experiment
from tests.sla_core.engine.conftest import losses


def test_one_process_run_trains_prunes_evaluates_and_exports(tiny_config, tmp_path):
    reports = []
    cfg = load_experiment(tiny_config(steps=6, checkpoint_every=4, eval_every=3))
    run_dir = tmp_path / "run"
    result, pruned, evaluation = run_experiment(
        cfg, run_dir=run_dir, report=lambda step, m: reports.append((step, m))
    )

    assert result == TrainResult.from_json(result.to_json()) and result.steps == 6
    assert Path(result.checkpoint) == run_dir / "checkpoints" / "step-0000006"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest",
        "step-0000004",
        "step-0000006",
    ]
    assert Path(result.trained) == run_dir / "checkpoints" / "step-0000006" / "adapters"
    assert Path(evaluation.metrics_path).parent == Path(pruned.path).parent == run_dir
    assert TrainResult.read(run_dir) == result
    assert PrunedAdapterSet.read(run_dir) == pruned and EvaluationReport.read(run_dir) == evaluation

    report = json.loads(Path(evaluation.metrics_path).read_text())
    task = report["tasks"]["rotten_tomatoes"]
    for stage in ("before", "after"):
        for split in ("validation", "test"):
            assert set(task[stage][split]) == {"clean", "noise0.1"}
            assert task[stage][split]["clean"]["n"] == 16
    assert task["before"]["test"] == task["after"]["test"]  # pruning is exact in eval mode
    assert report["trainable_percent"]["after"] <= report["trainable_percent"]["before"]
    assert set(pruned.open_candidates) == {"rotten_tomatoes"}
    from flows.pyfunc_model import _adapter_set_meta

    # the shipped set records its label names, so `sla predict` on the folder prints them
    shipped = _adapter_set_meta(Path(pruned.path))["tasks"]["rotten_tomatoes"]
    assert shipped["labels"] == ["rotten", "fresh"] and shipped["max_length"] == cfg.tasks[0].max_length
    assert report["noise_measured"]["rotten_tomatoes"]["test"]["noise0.1"]["char"] > 0
    assert evaluation.summary["val_accuracy"] == report["summary"]["val_accuracy"]
    assert result.metrics["val_accuracy"] == reports[-1][1]["val_accuracy"]  # the last validation
    card = (Path(pruned.path) / "README.md").read_text()  # written by prune, completed by evaluate
    assert "rotten_tomatoes" in card and "## Gate map" in card
    assert f"| rotten_tomatoes | {evaluation.summary['rotten_tomatoes/val_accuracy']:.4f} |" in card

    model = load_adapters(load_backbone("minilm"), pruned.path)
    assert model.pruned and model.trainable_percent() == pytest.approx(report["trainable_percent"]["after"])
    assert len(losses(run_dir)) == 6
    assert [s for s, _ in reports] == [3, 6]  # tune.report_every defaults past 6: eval_every drives these
    assert {"val_accuracy", "val_macro_f1", "trainable_percent_pruned", "train_loss"} <= set(reports[0][1])


def test_resume_of_a_finished_run_trains_nothing_and_a_fresh_start_is_refused(tiny_config, tmp_path):
    cfg = load_experiment(tiny_config(steps=2))
    run_dir = tmp_path / "run"
    first, _, _ = run_experiment(cfg, run_dir=run_dir)
    again, _, _ = run_experiment(cfg, run_dir=run_dir, resume=True)
    assert again.steps == 2 and again.checkpoint == first.checkpoint and len(losses(run_dir)) == 2
    with pytest.raises(CheckpointError, match="already holds checkpoints .* pass --resume"):
        run_experiment(cfg, run_dir=run_dir)
    bigger = load_experiment(tiny_config(steps=2, batch_size=4, name="other.yaml"))
    with pytest.raises(CheckpointError, match="train.batch_size 8 vs 4"):
        run_experiment(bigger, run_dir=run_dir, resume=True)


def test_nan_at_a_step_stops_with_the_last_good_checkpoint_intact(tiny_config, tmp_path):
    cfg = load_experiment(tiny_config(steps=8, checkpoint_every=2, debug_nan_at_step=5, zero_stage=2))
    run_dir = tmp_path / "run"
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss nan at step 5; .*checkpoints/step-0000004"
    ) as err:
        run_experiment(cfg, run_dir=run_dir)
    assert err.value.step == 5
    last = latest_checkpoint(run_dir / "checkpoints")
    assert last is not None and last.step == 4 and Path(last.path) == Path(err.value.checkpoint)
    weights = load_file(str(Path(last.path) / "adapters" / "sla_adapter_model.safetensors"))
    assert weights and all(v.isfinite().all() for v in weights.values())
    assert not list((run_dir / "checkpoints").glob(".tmp-*")) and not (run_dir / "metrics.json").exists()
    assert len(losses(run_dir)) == 4  # steps 1-4 logged; step 5 raised before its update and its log


WEIGHTS = ("down_weight", "up_weight", "down_bias", "up_bias")  # an adapter pool's tensors
PHASES = {"budget": 0.002, "dense_fraction": 0.25, "search_fraction": 0.25, "lambda_warmup_steps": 2}


@pytest.mark.parametrize("rewind", [False, True])  # with rewind the adapters restart at the decision
@pytest.mark.parametrize("nan_at", [5, 11])  # stopped in the dense phase, or after the decision (step 6)
def test_resume_across_the_schedule_phases_equals_a_straight_run(engine_cache, tmp_path, nan_at, rewind):
    from safetensors.torch import load_file

    from tests.sla_core.engine.conftest import experiment, write_config

    def cfg(name: str, **train):
        sla = {**PHASES, "rewind": rewind}
        spec = experiment(engine_cache, sla=sla, steps=12, checkpoint_every=3, **train)
        return load_experiment(write_config(tmp_path / name, spec))

    straight, _, _ = run_experiment(cfg("a.yaml"), run_dir=tmp_path / "straight", prune=False)
    run_dir = tmp_path / "stopped"
    with pytest.raises(NonFiniteLossError):
        run_experiment(cfg("b.yaml", debug_nan_at_step=nan_at), run_dir=run_dir)
    resumed, _, _ = run_experiment(cfg("a.yaml"), run_dir=run_dir, resume=True, prune=False)
    a = load_file(str(Path(straight.trained) / "sla_adapter_model.safetensors"))
    b = load_file(str(Path(resumed.trained) / "sla_adapter_model.safetensors"))
    assert a.keys() == b.keys() and bool(a["sla_decided_flag"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), [
        k for k in a if not torch.equal(a[k], b[k])
    ]
    assert losses(run_dir) == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)


def test_a_task_whose_gates_all_close_is_warned_about_and_not_shipped(engine_cache, tmp_path, capsys):
    from sla_core.model import EmptyStructureError
    from tests.sla_core.engine.conftest import experiment, write_config

    spec = experiment(engine_cache, sla={"gate_init": -3.0}, steps=2)  # decided closed from the start
    cfg = load_experiment(write_config(tmp_path / "c.yaml", spec))
    with pytest.raises(EmptyStructureError, match=r"\['rotten_tomatoes'\].*lambda_sparse=1.0"):
        run_experiment(cfg, run_dir=tmp_path / "run")
    assert (
        "warning: at step 1 every adapter of task(s) ['rotten_tomatoes'] is closed" in capsys.readouterr().err
    )
    assert (tmp_path / "run" / "result.json").is_file()  # the trained set is kept: prune it --allow-empty


def test_a_finite_but_diverging_loss_is_warned_about(engine_cache, tmp_path, capsys):
    from tests.sla_core.engine.conftest import experiment, write_config

    spec = experiment(engine_cache, steps=4, lr=1e6, max_grad_norm=0.0)  # no clipping: the loss explodes
    cfg = load_experiment(write_config(tmp_path / "d.yaml", spec))
    trained, _, _ = run_experiment(cfg, run_dir=tmp_path / "run", prune=False)
    err = capsys.readouterr().err
    assert "warning: the loss diverges" in err and "lower train.lr" in err
    assert trained.metrics["train/loss"] > 100  # finite, so nothing else would have said it
    calm = load_experiment(write_config(tmp_path / "c.yaml", experiment(engine_cache, steps=4)))
    run_experiment(calm, run_dir=tmp_path / "calm", prune=False)
    assert "diverges" not in capsys.readouterr().err


def test_rewind_is_refused_where_an_optimizer_master_copy_would_undo_it(engine_cache, tmp_path):
    from tests.sla_core.engine.conftest import experiment, write_config

    spec = experiment(engine_cache, sla={"rewind": True}, steps=2, zero_stage=1)
    cfg = load_experiment(write_config(tmp_path / "r.yaml", spec))
    with pytest.raises(ValueError, match=r"sla.rewind=true needs train.zero_stage=0 and fp32 \(got ZeRO-1"):
        run_experiment(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_decision_drops_the_closed_units_and_their_optimizer_state_without_changing_the_run(
    engine_cache, tmp_path, capsys
):
    """`train.compact` (the default) rebuilds the engine over the kept units at the decision; the run is the
    one that keeps every unit masked: the same losses and the same saved tensors, with the optimizer's state
    cut to what is kept."""
    from tests.sla_core.engine.conftest import experiment, write_config

    runs = {}
    for compact in (True, False):
        spec = experiment(engine_cache, sla=PHASES, steps=12, checkpoint_every=12, compact=compact)
        cfg = load_experiment(write_config(tmp_path / f"{compact}.yaml", spec))
        runs[compact], _, _ = run_experiment(cfg, run_dir=tmp_path / str(compact), prune=False)
    out = capsys.readouterr().out
    assert out.count("structure decided; training") == 1 and "kept parameters on" in out
    assert losses(tmp_path / "True") == pytest.approx(losses(tmp_path / "False"), abs=1e-6)
    a, b = (load_file(str(Path(runs[c].trained) / "sla_adapter_model.safetensors")) for c in (True, False))
    assert (
        a.keys() == b.keys()
        and bool(a["sla_decided_flag"])
        and torch.equal(a["sla_decided"], b["sla_decided"])
    )
    decided = a["sla_decided"]
    assert 0 < int(decided.sum()) < decided.numel()
    # gates, heads and the structure equal; the adapter weights are compared where they matter, in the pruned
    # sets below (a dropped unit stays as decided, while the masked run drifts it on Adam's momentum)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if not k.endswith(WEIGHTS))
    pruned = {c: prune(runs[c], tmp_path / f"pruned-{c}") for c in (True, False)}  # what ships: equal
    a, b = (load_file(str(Path(pruned[c].path) / "sla_adapter_model.safetensors")) for c in (True, False))
    assert a.keys() == b.keys() and a
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    def moments(run: TrainResult) -> int:
        state = Path(run.checkpoint) / "engine" / "state" / "mp_rank_00_model_states.pt"
        optimizer = torch.load(state, map_location="cpu", weights_only=False)["optimizer"]["state"]
        return sum(s["exp_avg"].numel() for s in optimizer.values())

    per_unit = 384 + 384  # a rank-1 LoRA-type unit of MiniLM's q/k/v/o: down row + up column
    assert (
        moments(runs[False]) - moments(runs[True]) >= per_unit * (decided.numel() - int(decided.sum())) // 2
    )
    assert runs[True].metrics.get("train/loss") == pytest.approx(runs[False].metrics["train/loss"], abs=1e-6)
