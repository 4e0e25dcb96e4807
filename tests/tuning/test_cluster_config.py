"""infra/ray/cluster.yaml is a valid `ray up` config with placeholders and no credentials."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "infra" / "ray" / "cluster.yaml"


def test_cluster_config_passes_rays_schema() -> None:
    raw = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(raw))  # what `ray up` checks before it touches a machine
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] == "HEAD_IP"
    assert any("make setup" in cmd for cmd in raw["setup_commands"])
    assert set(raw["auth"]) == {"ssh_user"}  # keys come from the SSH agent, never from this file
    text = CLUSTER.read_text().lower()
    assert "password" not in text and "secret" not in text


def test_cluster_runs_ray_with_token_auth() -> None:
    raw = yaml.safe_load(CLUSTER.read_text())
    commands = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "~/.ray/auth_token" in raw["file_mounts"]  # the token travels by file, never in this config
