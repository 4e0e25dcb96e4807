"""DeepSpeed config building: batch split, JSON files, contradictions, the shipped infra/deepspeed files."""

from __future__ import annotations

import json

import pytest

from sla_core.engine.ds import CPU, ZERO3_CPU_DEFAULTS, Device, build_settings
from sla_core.experiment import TrainConfig
from tests.sla_core.engine.conftest import ROOT


def test_global_batch_splits_into_micro_batches_per_rank_and_accumulation():
    s = build_settings(TrainConfig(batch_size=16, grad_accum=2), world_size=2)
    assert (s.micro_batch, s.grad_accum, s.zero_stage, s.precision) == (4, 2, 0, "fp32")
    assert s.config["train_batch_size"] == 16 and s.config["train_micro_batch_size_per_gpu"] == 4
    assert s.client_optimizer and not s.config["bf16"]["enabled"]


def test_batch_that_does_not_divide_names_the_fix():
    with pytest.raises(
        ValueError, match=r"train.batch_size=10 must be divisible by processes x grad_accum = 4 x 1"
    ):
        build_settings(TrainConfig(batch_size=10), world_size=4)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_shipped_json_sets_stage_and_a_deepspeed_built_optimizer(stage):
    path = ROOT / "infra" / "deepspeed" / f"zero{stage}.json"
    s = build_settings(TrainConfig(batch_size=8, deepspeed_config=path), world_size=2)
    assert s.zero_stage == stage and s.micro_batch == 4
    assert not s.client_optimizer and s.config["optimizer"]["params"]["torch_adam"] is True


def test_json_value_wins_over_a_default_but_not_over_an_explicit_setting(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 2}))
    s = build_settings(TrainConfig(batch_size=8, deepspeed_config=path), world_size=1)
    assert (s.zero_stage, s.grad_accum, s.micro_batch) == (3, 2, 4)
    with pytest.raises(ValueError, match=r"train.zero_stage=2 contradicts .*ds.json \(3\)"):
        build_settings(TrainConfig(zero_stage=2, deepspeed_config=path), world_size=1)


def test_zero3_on_the_cpu_gets_the_lean_fetch_settings_unless_the_json_sets_them(tmp_path):
    zero = build_settings(TrainConfig(zero_stage=3), world_size=2, device=CPU).config["zero_optimization"]
    assert zero == {**ZERO3_CPU_DEFAULTS, "stage": 3}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 7}}))
    zero = build_settings(TrainConfig(deepspeed_config=path), world_size=2, device=CPU).config
    assert zero["zero_optimization"]["stage3_prefetch_bucket_size"] == 7
    assert zero["zero_optimization"]["stage3_allgather_sequential"] is True
    gpu = Device("cuda", 0, "nccl")
    zero = build_settings(TrainConfig(zero_stage=3), world_size=2, device=gpu).config["zero_optimization"]
    assert zero == {"stage": 3}  # DeepSpeed's own defaults on a GPU
    zero = build_settings(TrainConfig(zero_stage=2), world_size=2, device=CPU).config["zero_optimization"]
    assert zero == {"stage": 2}


def test_json_batch_keys_must_agree_and_schedulers_are_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=3 but train.batch_size=8"):
        build_settings(TrainConfig(batch_size=8, deepspeed_config=path), world_size=2)
    path.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ValueError, match="remove `scheduler`"):
        build_settings(TrainConfig(deepspeed_config=path), world_size=1)


def test_missing_or_broken_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json not found"):
        build_settings(TrainConfig(deepspeed_config=tmp_path / "nope.json"), world_size=1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        build_settings(TrainConfig(deepspeed_config=bad), world_size=1)


def test_bf16_from_the_config():
    s = build_settings(TrainConfig(precision="bf16"), world_size=1)
    assert s.config["bf16"]["enabled"] and s.precision == "bf16"


def test_train_config_rejects_bad_debug_and_dropout_values():
    with pytest.raises(ValueError, match="debug_nan_at_step"):
        TrainConfig(debug_nan_at_step=0)
    with pytest.raises(ValueError, match="backbone_dropout"):
        TrainConfig(backbone_dropout=1.0)
