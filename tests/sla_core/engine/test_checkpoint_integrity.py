"""Checkpoints carry a manifest (sha256 of every file) that resume checks before loading anything:
a planted pickle never runs, a truncated or added file is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sla_core.engine import run_experiment
from sla_core.engine.checkpoint import MANIFEST, CheckpointError, latest_checkpoint, write_manifest
from sla_core.experiment import load_experiment

ENGINE_FILE = "engine/state/mp_rank_00_model_states.pt"


class _Plant:
    """Pickles to a call that leaves a marker file: what a planted engine file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.fixture
def trained(tiny_config, tmp_path):
    """A run folder after 2 steps (a checkpoint at step 2), and a config that resumes it to step 3."""
    run_dir = tmp_path / "run"
    run_experiment(load_experiment(tiny_config(steps=2)), run_dir=run_dir, prune=False, evaluate=False)
    ckpt = Path(latest_checkpoint(run_dir / "checkpoints").path)
    return run_dir, ckpt, load_experiment(tiny_config(steps=3, name="more.yaml"))


def test_a_checkpoint_lists_every_file_in_its_manifest(trained):
    _, ckpt, _ = trained
    listed = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {"meta.json", ENGINE_FILE, "adapters/sla_adapter_model.safetensors"} <= set(listed)
    assert all(len(digest) == 64 for digest in listed.values())


def test_a_planted_engine_pickle_is_refused_before_it_runs(trained, tmp_path):
    run_dir, ckpt, more = trained
    marker = tmp_path / "code-ran"
    torch.save({"module": _Plant(marker)}, ckpt / ENGINE_FILE)
    with pytest.raises(CheckpointError, match=rf"{ENGINE_FILE} does not match its sha256.*nothing was"):
        run_experiment(more, run_dir=run_dir, resume=True)
    assert not marker.exists()


def test_a_truncated_engine_file_is_named(trained):
    run_dir, ckpt, more = trained
    engine = ckpt / ENGINE_FILE
    engine.write_bytes(engine.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"does not match its sha256 \(changed or truncated\)"):
        run_experiment(more, run_dir=run_dir, resume=True)


def test_an_added_file_or_a_missing_manifest_is_refused(trained):
    run_dir, ckpt, more = trained
    (ckpt / "engine" / "state" / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"engine/state/extra\.pt is not in the manifest"):
        run_experiment(more, run_dir=run_dir, resume=True)
    (ckpt / "engine" / "state" / "extra.pt").unlink()
    (ckpt / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"no manifest\.json .* write_manifest"):
        run_experiment(more, run_dir=run_dir, resume=True)
    write_manifest(ckpt)  # the owner vouches for the folder: resume works again
    assert run_experiment(more, run_dir=run_dir, resume=True, prune=False, evaluate=False)[0].steps == 3
