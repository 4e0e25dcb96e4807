"""A real local search listens on loopback only: Ray's GCS, raylet, workers and agents, and the trials'
process groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from sla_core.experiment import ExperimentConfig
from tests.listeners import ListenerWatch, exposed
from tests.tuning.test_search import grid
from tuning.runner import run_search

pytestmark = pytest.mark.slow


def test_a_local_search_listens_on_loopback_only(
    search_config: ExperimentConfig, search_refs: dict, tmp_path: Path
) -> None:
    with ListenerWatch() as watch:
        result = run_search(grid(search_config), search_refs, out_dir=tmp_path, verbose=0)
    assert result.complete
    names = {name for name, _, _ in watch.seen}
    assert {"gcs_server", "raylet"} <= names, f"the watch saw no Ray server: {sorted(watch.seen)}"
    assert not exposed(watch.seen), f"listening beyond loopback: {exposed(watch.seen)}"


def test_joining_a_cluster_without_token_auth_warns(monkeypatch, caplog) -> None:
    from tuning.runner import _warn_unauthenticated

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _warn_unauthenticated("HEAD:6379")
    assert "RAY_AUTH_MODE is not `token`" in caplog.text
    caplog.clear()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    _warn_unauthenticated("HEAD:6379")
    assert not caplog.text
