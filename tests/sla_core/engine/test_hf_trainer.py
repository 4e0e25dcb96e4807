"""The model trains under a plain `transformers.Trainer`: its loss already includes λ x the penalty."""

from __future__ import annotations

import math

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from sla_core import SLAConfig, attach, load_adapters
from sla_core.backbones import load_backbone, load_tokenizer
from sla_core.data import prepare_tasks
from sla_core.experiment import ExperimentConfig
from tests.sla_core.engine.conftest import experiment


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
