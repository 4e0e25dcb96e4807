"""The device chosen at start: the local GPU with NCCL when CUDA is there, else the CPU with gloo.

No GPU exists on the test machine, so the CUDA branch is exercised with `torch.cuda`'s answers replaced
for the choice function alone; `bench/device_check.sh` runs the real thing on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from sla_core.engine import ds
from sla_core.engine.placement import model_device, to_device
from sla_core.experiment import TrainConfig


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_cpu_accelerator_gives_the_cpu_with_gloo():
    device = ds.choose_device(0, accelerator="cpu")
    assert device == ds.CPU and device.backend == "gloo" and not device.bf16
    assert device.torch_device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_this_machine_without_a_gpu_chooses_the_cpu():
    assert ds.choose_device() == ds.CPU


def test_cuda_gives_the_local_rank_s_gpu_with_nccl(two_gpus):
    device = ds.choose_device(1, accelerator="cuda")
    assert (device.type, device.index, device.backend, device.bf16) == ("cuda", 1, "nccl", True)
    assert device.torch_device == torch.device("cuda", 1) and str(device) == "cuda:1"


def test_more_processes_than_gpus_names_the_fix(two_gpus):
    with pytest.raises(ValueError, match=r"local rank 2 has no GPU: this node has 2; .*DS_ACCELERATOR=cpu"):
        ds.choose_device(2, accelerator="cuda")


def test_cuda_accelerator_without_a_visible_gpu_falls_back_to_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ds.choose_device(0, accelerator="cuda") == ds.CPU


def test_auto_precision_is_bf16_on_a_gpu_and_fp32_on_the_cpu(two_gpus, tmp_path):
    gpu = ds.Device("cuda", 0, "nccl", bf16=True)
    on_gpu = ds.build_settings(TrainConfig(precision="auto"), world_size=1, device=gpu)
    assert on_gpu.precision == "bf16" and on_gpu.config["bf16"]["enabled"]
    on_cpu = ds.build_settings(TrainConfig(precision="auto"), world_size=1, device=ds.CPU)
    assert on_cpu.precision == "fp32" and not on_cpu.config["bf16"]["enabled"]
    path = tmp_path / "ds.json"
    path.write_text('{"bf16": {"enabled": true}}')  # auto never contradicts the JSON
    s = ds.build_settings(TrainConfig(precision="auto", deepspeed_config=path), world_size=1, device=ds.CPU)
    assert s.precision == "bf16"


def test_batches_stay_as_they_are_on_the_cpu_and_models_report_their_device():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "note": "kept"}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["input_ids"] is batch["input_ids"] and moved["note"] == "kept"
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU


def test_one_process_group_runs_on_the_chosen_device():
    with ds.distributed() as dist:
        assert dist.device == ds.choose_device() and tdist.get_backend() == dist.device.backend
        total = ds.all_reduce_sum(torch.tensor([1.0, 2.0]))
        assert total.dtype == torch.float64 and total.tolist() == [1.0, 2.0]


def test_zero3_construction_partitions_and_writes_the_same_seeded_weights():
    from sla_core.backbones import load_backbone

    whole = load_backbone("random-llama:tiny")
    with ds.distributed() as dist:
        settings = ds.build_settings(TrainConfig(zero_stage=3), dist.world_size, dist.device)
        with ds.construction(settings) as assign:
            parts = load_backbone("random-llama:tiny", assign=assign)
        params = list(parts.parameters())
        assert params and all(ds.is_partitioned(p) and p.numel() == 0 for p in params)
        with ds.gathered(params):
            for (name, a), b in zip(whole.named_parameters(), params, strict=True):
                assert torch.equal(a, b.detach().cpu()), name
    below = ds.build_settings(TrainConfig(zero_stage=2), world_size=1)
    with ds.construction(below) as assign:
        assert not any(
            ds.is_partitioned(p) for p in load_backbone("random-llama:tiny", assign=assign).parameters()
        )
