"""An `mlflow.pyfunc` model over a pruned adapter set: texts in, label names out. No pickles anywhere.

MLflow logs this file as "model from code" (`python_model=<this file>`), so it stores no cloudpickle of the
class; its artifacts are the adapter folder (`adapter_config.json` + `adapter_model.safetensors`) and
`sla_model.json` (backbone alias/name/path, label names and max length per task). Loading needs the `sla`
package (for `sla_core`) and the backbone: by alias (`minilm`, `smollm2`), hub name or folder; override it at
load time with `mlflow.pyfunc.load_model(uri, model_config={"backbone": "/path/to/backbone"})`.

Input: a DataFrame with a `text` column (the first column if there is no `text`) and an optional `task`
column, a list of strings, or a string. With several tasks, give the task per row or `params={"task": ...}`.
"""

from __future__ import annotations

import json
import warnings
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
        from sla_core.backbones import load_backbone, load_tokenizer
        from sla_core.io import load_adapters

        meta = json.loads(Path(context.artifacts[META_KEY]).read_text(encoding="utf-8"))
        if meta.get("format") != META_FORMAT:
            raise ValueError(f"{context.artifacts[META_KEY]}: not an {META_FORMAT} description")
        backbone = (getattr(context, "model_config", None) or {}).get("backbone") or meta["backbone"]
        self.tasks: dict[str, dict[str, Any]] = meta["tasks"]
        self.tokenizer = load_tokenizer(backbone)
        self.model = load_adapters(load_backbone(backbone), context.artifacts[ADAPTERS_KEY]).eval()
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


def save_pyfunc_model(
    out_dir: Path, adapters_dir: Path, backbone: str, tasks: dict[str, dict[str, Any]], code_version: str
) -> Path:
    """Save the pyfunc model folder at `out_dir` (must not exist or be empty); returns it.

    The signature has no input schema on purpose (a DataFrame, a list of texts and a string are all
    accepted and checked in `predict`), a `task` param, and one label string out per row.
    """
    import importlib.metadata as md
    import tempfile

    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("task", "string", "")]),
    )
    pins = ["torch", "transformers", "safetensors", "tokenizers", "pandas", "mlflow"]
    with tempfile.TemporaryDirectory(prefix="sla-pyfunc-") as tmp, warnings.catch_warnings():
        # MLflow nags about type hints and input examples; the signature above is deliberate.
        warnings.filterwarnings(
            "ignore", message=".*(type hints|input example was not provided)", category=UserWarning
        )
        meta = write_model_meta(Path(tmp) / META_NAME, backbone, tasks, code_version)
        mlflow.pyfunc.save_model(
            path=str(out_dir),
            python_model=str(Path(__file__).resolve()),
            artifacts={ADAPTERS_KEY: str(adapters_dir), META_KEY: str(meta)},
            signature=signature,
            pip_requirements=[f"{p}=={md.version(p).split('+')[0]}" for p in pins],
            metadata={"sla_code_version": code_version, "backbone": backbone, "tasks": list(tasks)},
        )
    return Path(out_dir)


mlflow.models.set_model(SLAPyfuncModel())
