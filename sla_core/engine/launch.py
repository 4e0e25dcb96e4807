"""Multi-process and multi-node launching: build the launcher command that re-runs the worker entry point.

- `nproc > 1` on one machine, or `nnodes > 1` with one launcher per node: `torchrun` (static rendezvous at
  `master_addr:master_port`).
- `hostfile`: DeepSpeed's runner, which starts every node over ssh (pdsh by default), or with `no_ssh`
  only this node (`node_rank`), one runner per node.
Every process runs `python -m sla_core.engine.worker` with the same config, overrides and run directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Re-exported for the worker and older callers; the one `KEY=VALUE` parser lives with the config.
from sla_core.experiment import parse_overrides  # noqa: F401

WORKER_MODULE = "sla_core.engine.worker"


@dataclass(frozen=True)
class LaunchPlan:
    """How many processes on how many nodes, and how they find each other."""

    nproc: int = 1  # processes per node
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    hostfile: Path | None = None
    no_ssh: bool = False  # hostfile runs: start only this node's processes (run once per node)

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.nnodes < 1 or self.node_rank < 0:
            raise ValueError(
                f"need --nproc >= 1, --nnodes >= 1, --node-rank >= 0; "
                f"got {self.nproc}, {self.nnodes}, {self.node_rank}"
            )
        if self.hostfile is not None:
            if not Path(self.hostfile).is_file():
                raise FileNotFoundError(
                    f"--hostfile {self.hostfile} not found; it lists `host slots=N` per line"
                )
            # the hostfile defines the nodes; DeepSpeed's runner checks --node-rank against it
        elif self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be below --nnodes {self.nnodes}")
        missing = [flag for flag, value in (("--master-addr", self.master_addr),
                                            ("--master-port", self.master_port)) if not value]  # fmt: skip
        if self.multi_node and missing:
            raise ValueError(
                f"a job on several nodes needs {' and '.join(missing)}: the address of node 0, reachable "
                "from every node, and a port free there; pass the same values on every node"
            )

    @property
    def multi_node(self) -> bool:
        """More than one machine: --nnodes > 1, a hostfile with several hosts, or one runner per node."""
        if self.hostfile is None:
            return self.nnodes > 1
        hosts = [line for line in Path(self.hostfile).read_text().splitlines() if hostfile_slots(line)]
        return self.no_ssh or len(hosts) > 1

    @property
    def multi_process(self) -> bool:
        return self.nproc > 1 or self.nnodes > 1 or self.hostfile is not None

    def world_size(self) -> int:
        """Total processes: nproc x nnodes, or the hostfile's slots (capped at nproc per node if given)."""
        if self.hostfile is None:
            return self.nproc * self.nnodes
        slots = [hostfile_slots(line) for line in Path(self.hostfile).read_text().splitlines()]
        return sum(min(n, self.nproc) if self.nproc > 1 else n for n in slots if n)


def hostfile_slots(line: str) -> int:
    """Slots on one hostfile line (`host slots=N`; blank and # lines give 0)."""
    line = line.split("#", 1)[0].strip()
    if not line:
        return 0
    for field in line.split()[1:]:
        key, _, value = field.partition("=")
        if key == "slots" and value.isdigit():
            return int(value)
    raise ValueError(f"hostfile line {line!r}: expected `host slots=N`")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_args(config: Path, overrides: Sequence[str], run_dir: Path, resume: bool) -> list[str]:
    """The worker's own arguments (absolute paths: launchers may start it in another directory)."""
    args = ["--config", str(Path(config).resolve()), "--run-dir", str(Path(run_dir).resolve())]
    for item in overrides:
        args += ["--set", item]
    return args + (["--resume"] if resume else [])


def build_command(plan: LaunchPlan, args: Sequence[str]) -> list[str]:
    """The launcher command line for `plan` running the worker with `args`."""
    port = str(plan.master_port or free_port())
    if plan.hostfile is not None:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            str(plan.hostfile),
            "--master_port",
            port,
            "--no_local_rank",
            "--module",
        ]
        if plan.master_addr:
            cmd += ["--master_addr", plan.master_addr]
        if plan.nproc > 1:
            cmd += ["--num_gpus", str(plan.nproc)]  # on CPU: processes per node
        if plan.no_ssh:
            cmd += ["--no_ssh", "--node_rank", str(plan.node_rank)]
        return [*cmd, WORKER_MODULE, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(plan.nnodes),
        "--node-rank",
        str(plan.node_rank),
        "--nproc-per-node",
        str(plan.nproc),
        "--master-addr",
        plan.master_addr or "127.0.0.1",
        "--master-port",
        port,
        "--module",
        WORKER_MODULE,
        *args,
    ]


def launch_env(plan: LaunchPlan, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the launcher: the project on PYTHONPATH, one thread pool per process."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nproc)))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def run(cmd: Sequence[str], env: dict[str, str]) -> int:
    """Run the launcher and wait; SIGTERM and SIGINT are passed on (workers then checkpoint and stop)."""
    proc = subprocess.Popen(list(cmd), env=env)

    def forward(signum: int, frame: Any) -> None:
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def launch(
    plan: LaunchPlan, config: Path, overrides: Sequence[str], run_dir: Path, resume: bool = False
) -> int:
    """Start the job described by `plan` and wait for it. Returns the launcher's exit code."""
    cmd = build_command(plan, worker_args(config, overrides, run_dir, resume))
    return run(cmd, launch_env(plan))
