"""SLALogCallback: λ, the open fraction and the kept share in a Trainer's training log lines."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from sla_core import SLAConfig, attach
from sla_core.hf_trainer import SLALogCallback, SLATrainer, kept_share
from tests.sla_core.tiny import VOCAB, tiny_backbone

KEYS = {"lambda_sparse", "open_fraction", "kept_share", "task_loss"}


def _rows(n: int = 16) -> Dataset:
    ids = torch.randint(1, VOCAB, (n, 8), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * n, "labels": (ids[:, 0] % 2).tolist()}
    )


def _args(tmp_path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=3, per_device_train_batch_size=8, logging_steps=1,
        save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
    )  # fmt: skip


class _Seen(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        self.logs.append(dict(logs or {}))


def test_a_plain_trainer_with_the_callback_logs_lambda_open_fraction_and_kept_share(tmp_path):
    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4, lambda_sparse=0.5))
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_rows(), callbacks=[SLALogCallback()])
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 3 and all(KEYS <= set(r) for r in rows)
    last = rows[-1]
    assert last["lambda_sparse"] > 0 and 0 < last["open_fraction"] <= 1
    assert last["kept_share"] == kept_share(model) and 0 <= last["kept_share"] <= 1
    assert last["loss"] > last["task_loss"]  # λ x the penalty on top


def test_sla_trainer_puts_the_values_before_the_reporters(tmp_path):
    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4, lambda_sparse=0.5))
    seen = _Seen()
    SLATrainer(model=model, args=_args(tmp_path), train_dataset=_rows(), callbacks=[seen]).train()
    train_lines = [r for r in seen.logs if "loss" in r]
    assert len(train_lines) == 3 and all(KEYS <= set(r) for r in train_lines)
    assert not model._forward_hooks  # the hook is removed at the end of training
