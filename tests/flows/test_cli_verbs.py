"""Every `sla` verb a user runs by hand, on one tiny run, checked by its effect rather than its exit code:
`train` writes checkpoints and metrics; `prune` and `evaluate` reproduce `train`'s own export; `register`
and `promote` move the alias only on a better metric; `predict` on the champion labels like the adapter set;
`info` describes a set; `train --nproc 2` through the real launcher reproduces the one-process losses, and
a SIGTERM to that launcher leaves a checkpoint the run resumes from.

One module-scoped run feeds every test (the costly part is training and loading the backbone).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from tests.sla_core.engine.conftest import ROOT, experiment, losses, subprocess_env, write_config

pytestmark = pytest.mark.slow
STEPS = 12  # enough that a SIGTERM sent after the first logged step lands mid-run
MODEL = "sla-cli-verbs"
WEIGHTS = "sla_adapter_model.safetensors"
TEXTS = ["a gripping, beautiful film", "flat, dull and far too long", "it was fine", "a triumph", "boring"]


def sla(*args: str) -> Any:
    """`sla ARGS` in this process; fails the test with the output when the exit code is not 0."""
    out = CliRunner().invoke(app, [str(a) for a in args])
    assert out.exit_code == 0, f"sla {' '.join(map(str, args))} -> {out.exit_code}\n{out.output}"
    return out


@pytest.fixture(scope="module", autouse=True)
def _prefect_logs_outside_the_runner() -> None:
    """Import Prefect here, not first inside `CliRunner` (as `sla register` would): its console log handler
    keeps the stream it saw at import, and the runner's is closed after the call, which breaks every later
    flow run in the session (`ValueError: I/O operation on closed file`)."""
    import flows.pipeline  # noqa: F401


@pytest.fixture(scope="module")
def mlflow_env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("cli-mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("SLA_MLFLOW_ARTIFACT_ROOT", (root / "artifacts").as_uri())
        yield root


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine tests' deterministic one-task experiment (dropout off), with checkpoints every 5 steps."""
    root = tmp_path_factory.mktemp("cli")
    cfg = experiment(root / "cache", steps=STEPS, checkpoint_every=5)
    cfg["tasks"][0].update(max_train_examples=64, max_eval_examples=16)
    cfg["registry"] = {"model_name": MODEL}
    return write_config(root / "cli.yaml", cfg)


@pytest.fixture(scope="module")
def trained(config: Path) -> Path:
    """`sla train` in one process: the reference run of this module."""
    run_dir = config.parent / "run"
    out = sla("train", "--config", config, "--run-dir", run_dir)
    assert f"trained sla for {STEPS} steps" in out.output
    return run_dir


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


def _logits(adapters: Path, texts: list[str]) -> torch.Tensor:
    from sla_core.backbones import load_backbone, load_tokenizer
    from sla_core.io import load_adapters

    model = load_adapters(load_backbone("minilm"), adapters).eval()
    enc = load_tokenizer("minilm")(texts, return_tensors="pt", truncation=True, max_length=32, padding=True)
    with torch.no_grad():
        out = model(enc["input_ids"], attention_mask=enc["attention_mask"], task="rotten_tomatoes")
    return out.logits[:, :2]  # (B, 2)


def test_train_writes_checkpoints_metrics_and_a_pruned_set(trained: Path) -> None:
    steps = sorted(p.name for p in (trained / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps[-1] == f"step-{STEPS:07d}"
    assert (trained / "checkpoints" / steps[-1] / "adapters" / WEIGHTS).is_file()
    metrics = json.loads((trained / "metrics.json").read_text())
    after = metrics["tasks"]["rotten_tomatoes"]["after"]
    assert set(after) == {"validation", "test"} and 0.0 <= after["test"]["clean"]["accuracy"] <= 1.0
    assert len(losses(trained)) == STEPS and all(v == v for v in losses(trained))  # one finite loss a step
    assert (trained / "adapters" / WEIGHTS).is_file()


def test_prune_and_evaluate_reproduce_trains_own_export(trained: Path, config: Path, tmp_path: Path) -> None:
    pruned = tmp_path / "pruned"
    sla("prune", "--checkpoint", trained, "--out", pruned)
    mine, theirs = _tensors(pruned), _tensors(trained / "adapters")
    assert mine.keys() == theirs.keys() and mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(_logits(pruned, TEXTS), _logits(trained / "adapters", TEXTS))

    out = sla("evaluate", "--adapters", pruned, "--config", config, "--out", tmp_path / "eval")
    assert "rotten_tomatoes" in out.output and "test" in out.output
    mine = json.loads((tmp_path / "eval" / "metrics.json").read_text())["tasks"]["rotten_tomatoes"]["after"]
    theirs = json.loads((trained / "metrics.json").read_text())["tasks"]["rotten_tomatoes"]["after"]
    assert mine == theirs  # every split, noise level, accuracy, macro-F1 and count


def test_info_describes_an_adapter_set(trained: Path, tmp_path: Path) -> None:
    out = sla("info", "--adapters", trained / "adapters").output
    meta = json.loads((trained / "adapters" / "sla_adapter_config.json").read_text())
    assert "pruned" in out and "minilm (bert)" in out and "rotten_tomatoes (2 labels)" in out
    assert f"rank {meta['sla_config']['rank']}" in out and f"step {STEPS}" in out
    assert f"{meta['parameter_counts']['trainable']:,} parameters" in out and meta["sha256"] in out
    bad = CliRunner().invoke(app, ["info", "--adapters", str(tmp_path)])
    assert bad.exit_code == 1 and "sla_adapter_config.json: not found" in bad.output


def _client() -> Any:
    import os

    from mlflow import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    return MlflowClient(uri, uri)


def _champion() -> str:
    return str(_client().get_model_version_by_alias(MODEL, "champion").version)


def test_register_and_promote_move_the_alias_only_on_a_better_metric(trained: Path, mlflow_env: Path) -> None:
    out = sla("register", "--run-dir", trained, "--run-id", "first")
    assert f"{MODEL} v1 registered; promoted to @champion" in out.output
    again = sla("register", "--run-dir", trained, "--run-id", "first")
    assert f"{MODEL} v1 was already registered" in again.output
    v1 = _client().get_model_version(MODEL, "1")
    metric = "metric.test_accuracy_mean"
    value = float(v1.tags[metric])
    from flows.registry import register_adapter_set

    # A second version of the same model files, under its own pipeline run, worse than the champion.
    register_adapter_set(
        _client(), MODEL, v1.source, pipeline_run_id="second", run_id=None, metrics={}, tags={}
    )
    _client().set_model_version_tag(MODEL, "2", metric, repr(value - 0.1))
    out = sla("promote", "--model", MODEL, "--version", "2")
    assert "not promoted" in out.output and _champion() == "1"
    _client().set_model_version_tag(MODEL, "2", metric, repr(value + 0.1))
    out = sla("promote", "--model", MODEL, "--version", "2", "--margin", "0.2")  # better, not by the margin
    assert "not promoted" in out.output and _champion() == "1"
    out = sla("promote", "--model", MODEL, "--version", "2")
    assert "v2: promoted to @champion" in out.output and _champion() == "2"
    sla("promote", "--model", MODEL, "--version", "1", "--force")  # --force moves it back unconditionally
    assert _champion() == "1"


def test_predict_on_the_champion_labels_like_the_adapter_set(trained: Path, mlflow_env: Path) -> None:
    if not _has_champion():
        sla("register", "--run-dir", trained, "--run-id", "for-predict")
    args = [a for text in TEXTS for a in ("--text", text)]
    out = sla("predict", "--model", f"models:/{MODEL}@champion", *args).output
    rows = re.findall(r"(rotten|fresh)\t(.*)", out)  # a progress bar may precede the first row
    assert [text for _, text in rows] == TEXTS
    expected = [("rotten", "fresh")[i] for i in _logits(trained / "adapters", TEXTS).argmax(dim=-1).tolist()]
    assert [label for label, _ in rows] == expected


def _has_champion() -> bool:
    try:
        _champion()
    except Exception:
        return False
    return True


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll the run's tracking log until it holds `step` losses; fail if the launcher exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        if (run_dir / "tracking.jsonl").is_file() and len(losses(run_dir)) >= step:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s:\n{proc.communicate()[0][-4000:]}")


def test_train_nproc_2_through_the_launcher_survives_sigterm_and_gives_one_process_losses(
    trained: Path, config: Path, tmp_path: Path
) -> None:
    from sla_core.engine.checkpoint import latest_checkpoint

    run_dir = tmp_path / "two"
    cmd = [sys.executable, "-m", "flows.cli", "train", "--config", str(config), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(
        [*cmd, "--nproc", "2"], env=subprocess_env(), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_for_step(run_dir, 1, proc)
        proc.send_signal(signal.SIGTERM)  # to the `sla train` launcher only: it must pass it on
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = latest_checkpoint(run_dir / "checkpoints")
    assert proc.returncode != 0 and stopped is not None, output[-4000:]
    assert 1 <= stopped.step < STEPS and "stopped by SIGTERM" in output, output[-4000:]
    assert json.loads((Path(stopped.path) / "meta.json").read_text())["world_size"] == 2

    out = sla("train", "--config", config, "--run-dir", run_dir, "--nproc", "2", "--resume", "--no-evaluate")
    assert f"trained sla for {STEPS} steps" in out.output
    one, two = losses(trained), losses(run_dir)
    assert len(two) == len(one) == STEPS
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(two, one, strict=True)), (two, one)
