"""Launcher command lines and `--set` overrides (the commands themselves run in test_multiprocess.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sla_core.engine.launch import LaunchPlan, build_command, launch_env, parse_overrides, worker_args


def test_overrides_are_read_as_yaml_values():
    got = parse_overrides(
        ["train.steps=50", "sla.budget=0.014", "train.deepspeed_config=null", "name=x=y", "tasks_note=[1, 2]"]
    )
    assert got == {
        "train.steps": 50,
        "sla.budget": 0.014,
        "train.deepspeed_config": None,
        "name": "x=y",
        "tasks_note": [1, 2],
    }
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_overrides(["train.steps"])


def test_nproc_uses_torchrun_with_the_worker_module(tmp_path):
    args = worker_args(Path("configs/tiny.yaml"), ["train.steps=3"], tmp_path / "run", resume=True)
    assert args[1] == str(Path("configs/tiny.yaml").resolve()) and args[-1] == "--resume"
    cmd = build_command(LaunchPlan(nproc=2, master_port=1234), args)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[cmd.index("--master-port") + 1] == "1234"
    assert cmd[cmd.index("--module") + 1] == "sla_core.engine.worker" and cmd[-len(args) :] == args


def test_two_torchrun_launchers_one_per_node():
    plan = LaunchPlan(nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29500)
    cmd = build_command(plan, [])
    for flag, value in (("--nnodes", "2"), ("--node-rank", "1"), ("--master-addr", "10.0.0.1")):
        assert cmd[cmd.index(flag) + 1] == value


def test_hostfile_uses_the_deepspeed_runner(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    cmd = build_command(LaunchPlan(hostfile=hostfile, master_addr="worker-0", master_port=29500), ["--x"])
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert "--no_ssh" not in cmd and cmd[-2:] == ["sla_core.engine.worker", "--x"]
    plans = [LaunchPlan(hostfile=hostfile, nproc=n, master_addr="w", master_port=1) for n in (1, 2)]
    assert [plan.world_size() for plan in plans] == [4, 4]
    assert LaunchPlan(nproc=2, nnodes=2, master_addr="a", master_port=1).world_size() == 4
    local = build_command(
        LaunchPlan(hostfile=hostfile, no_ssh=True, node_rank=1, master_addr="worker-0", master_port=29500), []
    )
    assert local[local.index("--node_rank") + 1] == "1" and "--no_ssh" in local


def test_bad_plans_fail_early(tmp_path):
    with pytest.raises(FileNotFoundError, match="--hostfile .* not found"):
        LaunchPlan(hostfile=tmp_path / "missing")
    with pytest.raises(ValueError, match="needs --master-addr and --master-port: the address of node 0"):
        LaunchPlan(nnodes=2, node_rank=1)
    with pytest.raises(ValueError, match="--node-rank 2 must be below --nnodes 2"):
        LaunchPlan(nnodes=2, node_rank=2, master_addr="a")


def test_launch_env_puts_the_project_first_and_splits_threads(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    env = launch_env(LaunchPlan(nproc=2), base={"PYTHONPATH": "/elsewhere"})
    root = Path(env["PYTHONPATH"].split(":")[0])
    assert env["PYTHONPATH"].split(":")[1] == "/elsewhere" and (root / "sla_core/engine/worker.py").is_file()
    assert env["OMP_NUM_THREADS"] == "4"  # 8 cores shared by 2 processes
    assert launch_env(LaunchPlan(nproc=16), base={})["OMP_NUM_THREADS"] == "1"  # never 0
    mine = launch_env(LaunchPlan(nproc=2), base={"OMP_NUM_THREADS": "3"})
    assert mine["OMP_NUM_THREADS"] == "3"  # the user's own setting is kept


def test_several_nodes_need_both_the_master_address_and_port(tmp_path):
    with pytest.raises(ValueError, match=r"needs --master-port: "):
        LaunchPlan(nnodes=2, master_addr="10.0.0.1")
    with pytest.raises(ValueError, match=r"needs --master-addr: "):
        LaunchPlan(nnodes=2, master_port=29500)
    two_hosts, one_host = tmp_path / "two", tmp_path / "one"
    two_hosts.write_text("# nodes\nworker-0 slots=2\nworker-1 slots=2\n")
    one_host.write_text("localhost slots=2\n")
    with pytest.raises(ValueError, match=r"needs --master-addr and --master-port"):
        LaunchPlan(hostfile=two_hosts)
    with pytest.raises(ValueError, match=r"needs --master-port"):
        LaunchPlan(hostfile=one_host, no_ssh=True, master_addr="worker-0")  # one runner per node
    assert not LaunchPlan(hostfile=one_host).multi_node and not LaunchPlan(nproc=2).multi_node
    assert LaunchPlan(nnodes=2, master_addr="10.0.0.1", master_port=29500).multi_node
