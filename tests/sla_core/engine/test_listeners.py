"""One-process training opens no socket beyond loopback: no TCPStore on `*`."""

from __future__ import annotations

from sla_core.engine import run_experiment
from sla_core.experiment import load_experiment
from tests.listeners import exposed, listening


def test_a_one_process_run_listens_on_loopback_only(tiny_config, tmp_path):
    seen: list[set] = []
    cfg = load_experiment(tiny_config(steps=2, eval_every=1))
    run_experiment(cfg, run_dir=tmp_path / "run", report=lambda step, m: seen.append(listening()))
    assert seen and all(seen), "no listener seen while the process group was up"
    assert not exposed(set().union(*seen)), f"listening beyond loopback: {exposed(set().union(*seen))}"
