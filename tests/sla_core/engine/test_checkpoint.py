"""Checkpoint folders: atomic commit, the `latest` pointer, stale temp folders, refusing a mismatch."""

from __future__ import annotations

import json

import pytest

from sla_core.engine import checkpoint as ck
from sla_core.experiment import ExperimentConfig


def _finished_tmp(root, step):
    tmp = root / f".tmp-{ck.step_name(step)}"
    tmp.mkdir(parents=True)
    (tmp / ck.META).write_text(
        json.dumps({"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION, "step": step})
    )
    return tmp


def test_commit_moves_into_place_points_latest_and_keeps_the_newest_two(tmp_path):
    for step in (2, 4, 6):
        ck.commit(_finished_tmp(tmp_path, step), tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000004", "step-0000006"]
    assert ck.latest_checkpoint(tmp_path) == ck.CheckpointRef(str(tmp_path / "step-0000006"), 6)


def test_a_killed_write_never_replaces_the_last_good_checkpoint(tmp_path):
    ck.commit(_finished_tmp(tmp_path, 4), tmp_path, 4)
    killed = tmp_path / ".tmp-step-0000006"  # what a write killed half-way leaves: files, no rename
    (killed / "engine").mkdir(parents=True)
    (killed / "engine" / "half.pt").write_bytes(b"\0" * 10)
    assert ck.latest_checkpoint(tmp_path).step == 4
    assert ck.resolve_checkpoint(tmp_path).step == 4
    ck.clean_stale(tmp_path)
    assert not killed.exists() and ck.latest_checkpoint(tmp_path).step == 4


def test_no_checkpoint_yet_and_foreign_folders(tmp_path):
    assert ck.latest_checkpoint(tmp_path) is None
    with pytest.raises(ck.CheckpointError, match="not a complete checkpoint"):
        ck.read_meta(tmp_path)
    (tmp_path / ck.META).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ck.CheckpointError, match="not an sla-checkpoint version 1"):
        ck.read_meta(tmp_path)


def test_resolve_accepts_a_run_folder(tmp_path):
    root = tmp_path / "checkpoints"
    ck.commit(_finished_tmp(root, 3), root, 3)
    assert ck.resolve_checkpoint(tmp_path).step == 3
    assert ck.resolve_checkpoint(root / "step-0000003").step == 3


def test_resuming_another_setup_is_refused_with_the_differences(engine_cache):
    from tests.sla_core.engine.conftest import experiment

    cfg = ExperimentConfig.model_validate(experiment(engine_cache))
    meta = {
        "experiment": cfg.model_dump(mode="json"),
        "fingerprints": {"rotten_tomatoes": "abc"},
        "world_size": 2,
        "zero_stage": 2,
    }
    ck.check_resumable(meta, cfg, {"rotten_tomatoes": "abc"}, world_size=2, zero_stage=2, path="P")
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 16})})
    with pytest.raises(ck.CheckpointError) as err:
        ck.check_resumable(meta, other, {"rotten_tomatoes": "xyz"}, world_size=1, zero_stage=3, path="P")
    text = str(err.value)
    for part in ("train.batch_size 8 vs 16", "fingerprints", "2 process(es) then vs 1 now", "ZeRO stage 2"):
        assert part in text
    # the same `sla:` section, but a default it does not name changed (the budget recipe's gate)
    resolved = {"gate": "hard_concrete", "budget": 0.002, "paths": ["lora"]}
    with_resolved = {**meta, "sla_resolved": resolved}
    ck.check_resumable(with_resolved, cfg, {"rotten_tomatoes": "abc"}, 2, 2, "P", dict(resolved))
    with pytest.raises(ck.CheckpointError, match="gate 'hard_concrete' then vs 'sensitivity' now"):
        ck.check_resumable(
            with_resolved, cfg, {"rotten_tomatoes": "abc"}, 2, 2, "P", {**resolved, "gate": "sensitivity"}
        )


def test_engine_errors_survive_pickling():
    """Ray pickles a failed trial's exception to the driver; the message and fields must survive."""
    import pickle

    from sla_core.engine.result import NonFiniteLossError, TrainingInterrupted

    for err in (NonFiniteLossError(7, float("nan"), "runs/x/ckpt"), TrainingInterrupted(3, "runs/x/ckpt")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)
        assert again.step == err.step and again.checkpoint == err.checkpoint
