"""`SLATrainer`: a `transformers.Trainer` that saves and resumes the adapter set, not the backbone.

A plain `Trainer` already trains, evaluates and predicts with an `SLAModel` (its forward returns a
`ModelOutput` whose loss includes λ x the penalty). What it cannot do alone is save: for a model that is not
a `PreTrainedModel` it writes the whole state dict, frozen backbone included. This subclass writes the
adapter set (`model.save_pretrained`) in `save_model()` and in every checkpoint, reads it back on
`resume_from_checkpoint` and `load_best_model_at_end`, and adds the sparsity diagnostics to each log line
(`SLALogCallback`, which a plain `Trainer` can take too).

    trainer = SLATrainer(model=model, args=args, train_dataset=train, eval_dataset=test, ...)
    trainer.train(); trainer.evaluate(); trainer.predict(test); trainer.save_model("out/adapters")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from sla_core.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer writes beside a saved model


class SLALogCallback(TrainerCallback):
    """Adds the sparsity diagnostics of the last training forward to each training log line:
    `lambda_sparse` (λ now), `open_fraction` (the expected share of adapter parameters open), `kept_share`
    (the share of adapter parameters that pruning now would keep) and `task_loss` (the loss without λ x the
    penalty).

    Trainer calls callbacks in order and its reporters (console, MLflow, TensorBoard) come first, so a
    callback passed in `callbacks=` adds the values to `state.log_history` only. To have the reporters show
    them, put it first: `trainer.callback_handler.callbacks.insert(0, SLALogCallback())`, as `SLATrainer`
    does.
    """

    def __init__(self) -> None:
        self._last: Any = None
        self._hook: Any = None
        self._model: torch.nn.Module | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        if model is not None and hasattr(model, "sla_gates") and self._hook is None:
            self._hook = model.register_forward_hook(self._keep)
            self._model = model

    def _keep(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if module.training and hasattr(output, "lambda_sparse"):
            self._last = output

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        out = self._last
        if out is None or logs is None or "loss" not in logs:  # not a training log line
            return
        values = {"lambda_sparse": float(out.lambda_sparse)}
        if out.open_fraction is not None:
            values["open_fraction"] = float(out.open_fraction)
        share = kept_share(self._model) if self._model is not None else None
        if share is not None:
            values["kept_share"] = share
        if out.task_loss is not None:
            values["task_loss"] = float(out.task_loss.detach())
        logs.update(values)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(values)  # Trainer appended a copy of `logs` before the callbacks


def kept_share(model: torch.nn.Module) -> float | None:
    """The share of candidate adapter parameters the gates' decision keeps now; None once pruned, or when
    the gates are a ZeRO-3 shard outside the forward."""
    gates = getattr(model, "sla_gates", None)
    if gates is None or gates.log_alpha.numel() == 0:
        return None
    kept = (model.decided_gates() > 0).any(dim=0).to(model.member_params.dtype)  # (C, K)
    return float((kept * model.member_params).sum() / model.member_params.sum())


class SLATrainer(Trainer):
    """`Trainer` for `SLAModel`: saves only the adapter set (adapters, gates, heads) and logs the sparsity
    diagnostics (`SLALogCallback`, placed before the reporters)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.callback_handler.callbacks.insert(0, SLALogCallback())

    def _sla_model(self) -> torch.nn.Module | None:
        model = self.accelerator.unwrap_model(self.model)
        return model if hasattr(model, "load_sla_state") and hasattr(model, "save_pretrained") else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._sla_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_sla(self, folder: str, model: torch.nn.Module | None = None) -> bool:
        model = model if model is not None else self._sla_model()
        if model is None or not (Path(folder) / CONFIG_NAME).is_file():
            return False
        read_adapter_config(folder)  # the description and its sealed digest
        model.load_sla_state(load_file(str(Path(folder) / WEIGHTS_NAME)))
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None):
        if not self._load_sla(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_sla(self.state.best_model_checkpoint):
            super()._load_best_model()
