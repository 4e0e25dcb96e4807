"""The embedded default in one place: sqlite MLflow + artifacts under `data/`, ephemeral Prefect, local Ray.

Every value can be overridden by its environment variable. `apply_embedded_defaults()` must run before
`prefect` is imported (Prefect reads its settings once at import), so the CLI and `flows.pipeline` call it
first. Servers for teams are started by `infra/scripts/start_{mlflow,prefect}.sh`; point at them with
`MLFLOW_TRACKING_URI=http://127.0.0.1:5000` and `PREFECT_API_URL=http://127.0.0.1:4200/api`.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "SLA_DATA_DIR"
START_MLFLOW = "infra/scripts/start_mlflow.sh"
START_PREFECT = "infra/scripts/start_prefect.sh"


@dataclass(frozen=True)
class Settings:
    """Where the pipeline keeps its state. Paths are absolute."""

    data_dir: Path
    tracking_uri: str
    artifact_root: str
    prefect_home: Path
    prefect_api_url: str | None

    @property
    def embedded_mlflow(self) -> bool:
        """True when MLflow is the local sqlite/file store (no server)."""
        return not self.tracking_uri.startswith(("http://", "https://"))

    def mlflow_ui_command(self) -> str:
        """How a person opens the MLflow UI on this store."""
        if not self.embedded_mlflow:
            return f"open {self.tracking_uri} in a browser"
        return (
            f"mlflow ui --backend-store-uri {self.tracking_uri} --default-artifact-root {self.artifact_root} "
            "--host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"
        )


def data_dir() -> Path:
    """The project's data folder: `$SLA_DATA_DIR`, else `./data`."""
    return Path(os.environ.get(DATA_DIR_ENV, "data")).expanduser().resolve()


def current() -> Settings:
    """The settings from the environment, with the embedded defaults for anything unset."""
    root = data_dir()
    return Settings(
        data_dir=root,
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
        artifact_root=os.environ.get("SLA_MLFLOW_ARTIFACT_ROOT") or (root / "mlflow" / "artifacts").as_uri(),
        prefect_home=Path(os.environ.get("PREFECT_HOME") or root / "prefect").resolve(),
        prefect_api_url=os.environ.get("PREFECT_API_URL") or None,
    )


def apply_embedded_defaults() -> Settings:
    """Set the environment variables of the embedded default where the user has not set them.

    Creates the local folders (nothing else is written). Safe to call more than once.
    """
    s = current()
    os.environ.setdefault("MLFLOW_TRACKING_URI", s.tracking_uri)
    os.environ.setdefault("PREFECT_HOME", str(s.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's 20 s for the ephemeral API server to start is too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    s.prefect_home.mkdir(parents=True, exist_ok=True)
    ensure_store_dir(s.tracking_uri)
    return s


def ensure_store_dir(tracking_uri: str) -> None:
    """Create the folder of a local sqlite store (MLflow creates the file, not its folder)."""
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def probe_http(url: str, timeout: float = 3.0) -> str | None:
    """GET `url`; None when it answers 2xx, else a short reason (refused, timeout, HTTP status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http(s) only, checked by callers)
            return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return str(getattr(err, "reason", err))


def check_prefect_api(url: str | None, timeout: float = 3.0) -> str:
    """The Prefect API URL if a server answers there; raises RuntimeError naming the fix otherwise."""
    if not url:
        raise RuntimeError(
            "PREFECT_API_URL is not set: schedules need a Prefect server. Start one with "
            f"`{START_PREFECT}` (binds 127.0.0.1:4200) and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    if not url.startswith(("http://", "https://")):
        raise RuntimeError(f"PREFECT_API_URL={url!r} is not an http(s) URL, e.g. http://127.0.0.1:4200/api")
    reason = probe_http(url.rstrip("/") + "/health", timeout)
    if reason is not None:
        raise RuntimeError(
            f"no Prefect server answers at PREFECT_API_URL={url} ({reason}); start it with `{START_PREFECT}` "
            "or fix the URL"
        )
    return url


def code_version(repo: Path | None = None) -> str:
    """The git commit of the code (`<sha>-dirty` with local changes), else the package version."""
    root = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if sha.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            )
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    import importlib.metadata

    try:
        return "sla-" + importlib.metadata.version("sla")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
