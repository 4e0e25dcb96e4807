"""`SLATrainer`: a `transformers.Trainer` that saves and resumes the adapter set, not the backbone.

A plain `Trainer` already trains, evaluates and predicts with an `SLAModel` (its forward returns a
`ModelOutput` whose loss includes λ x the penalty). What it cannot do alone is save: for a model that is not
a `PreTrainedModel` it writes the whole state dict, frozen backbone included. This subclass writes the
adapter set (`model.save_pretrained`) in `save_model()` and in every checkpoint, reads it back on
`resume_from_checkpoint` and `load_best_model_at_end`, and adds the sparsity diagnostics to each log line.

    trainer = SLATrainer(model=model, args=args, train_dataset=train, eval_dataset=test, ...)
    trainer.train(); trainer.evaluate(); trainer.predict(test); trainer.save_model("out/adapters")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import Trainer

from sla_core.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer writes beside a saved model


class SLATrainer(Trainer):
    """`Trainer` for `SLAModel`: saves only the adapter set (adapters, gates, heads) and logs
    `lambda_sparse`, `open_fraction` (the expected share of adapter parameters kept) and `task_loss`."""

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None) -> Any:
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            self._sla_last = outputs
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        out = getattr(self, "_sla_last", None)
        if out is not None and "loss" in logs:  # a training log line
            logs["lambda_sparse"] = float(out.lambda_sparse)
            if out.open_fraction is not None:
                logs["open_fraction"] = float(out.open_fraction)
            if out.task_loss is not None:
                logs["task_loss"] = float(out.task_loss.detach())
        super().log(logs, start_time)
