"""Issue 16, item 6: `sla run` says which stage runs and how each search trial ended."""

from __future__ import annotations

from types import SimpleNamespace


def test_the_pipeline_clock_logs_stage_k_of_n():
    from flows.pipeline import _Clock

    lines = []
    clock = _Clock(total=3, say=lambda fmt, *args: lines.append(fmt % args))
    assert clock.run("prepare", lambda x: x + 1, 1) == 2
    clock.run("train", lambda: None)
    assert lines[0] == "stage 1/3: prepare" and lines[2] == "stage 2/3: train"
    assert lines[1].startswith("stage 1/3: prepare done in ")


def test_a_finished_trial_prints_one_line(capsys):
    from tuning.callbacks import say_trial

    done = SimpleNamespace(trial_id="t0", status="TERMINATED", last_result={})
    trial = SimpleNamespace(
        trial_id="t1", status="RUNNING", last_result={"training_iteration": 4, "val_accuracy": 0.8}
    )
    say_trial(trial, "completed", [done, trial])
    assert capsys.readouterr().out.strip() == (
        "search: trial t1 completed after 4 reports, val_accuracy 0.8000 (2/2 trials done)"
    )
