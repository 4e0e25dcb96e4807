"""Fixtures for the pipeline tests: isolated state folders, a real sqlite MLflow store, a real adapter set,
and real servers started with the project's own scripts (always stopped in teardown)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "infra" / "scripts"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def isolated_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point the embedded default (data folder, Prefect home, MLflow store) at a session folder.

    Runs before any test imports `flows.pipeline`, which applies the defaults before importing Prefect.
    """
    root = tmp_path_factory.mktemp("sla-data")
    keys = (
        "SLA_DATA_DIR",
        "PREFECT_HOME",
        "MLFLOW_TRACKING_URI",
        "PREFECT_API_URL",
        "SLA_MLFLOW_ARTIFACT_ROOT",
    )
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["SLA_DATA_DIR"] = str(root)
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("SLA_MLFLOW_ARTIFACT_ROOT", None)
    os.environ["SLA_TORCH_THREADS"] = "1"  # the suite shares the cores
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite tracking + registry store (and file artifacts) for one test; returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SLA_MLFLOW_ARTIFACT_ROOT", (tmp_path / "mlflow" / "artifacts").as_uri())
    return uri


# Texts the serving tests label; on each the saved set's label differs from the backbone's without adapters.
PROBES = [("a gripping, beautiful film", "sentiment"), ("stocks fell sharply on monday", "topic")]


def probe_labels(model: Any) -> list[int]:
    """`model`'s predicted class index for each of PROBES."""
    import torch

    from sla_core.backbones import load_tokenizer

    tok, out = load_tokenizer("minilm"), []
    for text, task in PROBES:
        enc = tok([text], return_tensors="pt", truncation=True, max_length=32)
        with torch.no_grad():
            logits = model(enc["input_ids"], attention_mask=enc["attention_mask"], task=task).logits
        out.append(int(logits[0, : len(TASKS[task]["labels"])].argmax()))
    return out


@pytest.fixture(scope="session")
def adapter_set_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real pruned two-task adapter set on MiniLM, in memory, whose adapters decide its predictions.

    An untrained set's up-projections are zero (its adapters add nothing), so a bug that dropped the adapter
    weights on loading would go unseen; here they are seeded random values that change the label of every
    probe text.
    """
    import torch

    from sla_core import SLAConfig, attach
    from sla_core.backbones import load_backbone

    model = attach(load_backbone("minilm"), SLAConfig(tasks={"sentiment": 2, "topic": 3}, rank=4, seed=1))
    ups = [p for n, p in model.named_parameters() if n.endswith(("up_weight", "up_bias"))]
    with torch.no_grad():
        without = probe_labels(model.prune().eval())  # up-projections all zero: the adapters add nothing
        for seed in range(20):  # the first seed whose adapters flip every probe (deterministic)
            generator = torch.Generator().manual_seed(seed)
            for p in ups:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            pruned = model.prune().eval()
            if all(a != b for a, b in zip(probe_labels(pruned), without, strict=True)):
                return pruned
    raise AssertionError("no seed made the adapters change every probe label")


@pytest.fixture(scope="session")
def adapter_set(adapter_set_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`adapter_set_model` saved as an adapter set folder."""
    out = tmp_path_factory.mktemp("adapters") / "adapters"
    adapter_set_model.save_adapters(str(out))
    return out


TASKS = {
    "sentiment": {"labels": ["rotten", "fresh"], "max_length": 32},
    "topic": {"labels": ["business", "sport", "tech"], "max_length": 32},
}


@pytest.fixture(scope="session")
def pyfunc_dir(adapter_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter set saved as an mlflow.pyfunc model folder."""
    from flows.pyfunc_model import save_pyfunc_model

    return save_pyfunc_model(
        tmp_path_factory.mktemp("pyfunc") / "model", adapter_set, "minilm", TASKS, "test"
    )


def run_script(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(
        ["bash", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `mlflow server` on 127.0.0.1, started by infra/scripts/start_mlflow.sh; stopped after."""
    store, port = tmp_path_factory.mktemp("mlflow-server"), str(free_port())
    args = ("--port", port, "--store", str(store))
    run_script(str(SCRIPTS / "start_mlflow.sh"), *args)
    try:
        yield {"uri": f"http://127.0.0.1:{port}", "store": str(store), "port": port}
    finally:
        run_script(str(SCRIPTS / "start_mlflow.sh"), "--stop", *args)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `prefect server` on 127.0.0.1, started by infra/scripts/start_prefect.sh; stopped after."""
    home, port = tmp_path_factory.mktemp("prefect-server"), str(free_port())
    args = ("--port", port, "--home", str(home))
    run_script(str(SCRIPTS / "start_prefect.sh"), *args)
    try:
        yield {"api": f"http://127.0.0.1:{port}/api", "home": str(home)}
    finally:
        run_script(str(SCRIPTS / "start_prefect.sh"), "--stop", *args)
