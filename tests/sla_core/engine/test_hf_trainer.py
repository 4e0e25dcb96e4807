"""The model trains under a plain `transformers.Trainer`: its loss already includes λ x the penalty."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from sla_core import SLAConfig, attach, load_adapters
from sla_core.backbones import load_backbone, load_tokenizer
from sla_core.data import prepare_tasks
from sla_core.experiment import ExperimentConfig
from sla_core.hf_trainer import SLATrainer
from sla_core.io import CONFIG_NAME, WEIGHTS_NAME
from tests.sla_core.engine.conftest import experiment
from tests.sla_core.tiny import VOCAB, tiny_backbone


def test_hf_trainer_trains_gates_and_adapters_and_the_result_prunes_and_saves(engine_cache, tmp_path):
    cfg = ExperimentConfig.model_validate(experiment(engine_cache))
    tokenizer = load_tokenizer("minilm")
    ref = prepare_tasks(cfg.tasks, tokenizer, engine_cache, progress=False)["rotten_tomatoes"]
    train = ref.load("train").select_columns(["input_ids", "attention_mask", "labels"])

    model = attach(
        load_backbone("minilm"), SLAConfig(tasks={"rotten_tomatoes": 2}, rank=4, lambda_sparse=1.0)
    )
    gates_before = model.sla_gates.log_alpha.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), use_cpu=True, max_steps=4, per_device_train_batch_size=8,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=1e-3, gate_lr=0.05))
    trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=(optimizer, None),
                      data_collator=DataCollatorWithPadding(tokenizer))  # fmt: skip
    assert not trainer.model_accepts_loss_kwargs  # the loss is the model's own mean: no rescaling by HF
    trainer.train()

    logged = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 4 and all(math.isfinite(x) for x in logged)
    # Cross-entropy of 2 classes starts near ln 2 = 0.69; λ x open fraction (~0.99) on top makes it > 1.5.
    assert min(logged) > 1.5
    assert (model.sla_gates.log_alpha.detach() < gates_before).all()  # the penalty closes gates
    pruned = model.eval().prune()
    pruned.save_adapters(str(tmp_path / "adapters"))
    assert load_adapters(load_backbone("minilm"), tmp_path / "adapters").pruned


def _tiny_rows(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 12), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * n, "labels": (ids[:, 0] % 2).tolist()}
    )


def test_trainer_evaluates_predicts_checkpoints_resumes_and_saves_the_adapters_only(tmp_path):
    """The output is a ModelOutput, so evaluate/predict work; saves hold the adapter set."""
    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4, lambda_sparse=0.5))
    train, test = _tiny_rows(32, 0), _tiny_rows(12, 1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), use_cpu=True, max_steps=4, per_device_train_batch_size=8,
        per_device_eval_batch_size=5, logging_steps=2, save_strategy="steps", save_steps=2, report_to=[],
        seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = SLATrainer(model=model, args=args, train_dataset=train, eval_dataset=test)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert logged and {"lambda_sparse", "open_fraction", "task_loss"} <= set(logged[0])

    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    pred = trainer.predict(test)
    assert pred.predictions.shape == (12, 2) and pred.label_ids.shape == (12,)  # the logits alone
    assert Trainer(model=model, args=args, eval_dataset=test).evaluate()["eval_loss"] == pytest.approx(
        metrics["eval_loss"]
    )  # a plain Trainer evaluates too

    checkpoint = tmp_path / "hf" / "checkpoint-2"
    assert (checkpoint / CONFIG_NAME).is_file() and not (checkpoint / "model.safetensors").exists()
    trainer.save_model(str(tmp_path / "saved"))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME, "training_args.bin"]
    )
    loaded = load_adapters(tiny_backbone("bert"), tmp_path / "saved")
    ids = torch.tensor(test["input_ids"][:3])
    model.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    resumed = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4, lambda_sparse=0.5))
    again = SLATrainer(model=resumed, args=args, train_dataset=train)
    again._load_from_checkpoint(str(tmp_path / "hf" / "checkpoint-4"))
    resumed.eval()
    torch.testing.assert_close(resumed(input_ids=ids).logits, model(input_ids=ids).logits)
