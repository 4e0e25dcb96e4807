"""The DeepSpeed boundary: the only module of the project that imports deepspeed.

It builds the DeepSpeed config from `TrainConfig` (optionally over a JSON file such as
`infra/deepspeed/zero3.json`), sets up the process group (one process without a launcher included),
wraps the model in an engine, and gathers ZeRO-3 partitioned parameters for saving.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from sla_core.adapters import is_adapter_key
from sla_core.engine.launch import free_port
from sla_core.experiment import TrainConfig


def _import_deepspeed() -> Any:
    """DeepSpeed's autotuner (unused here) imports MLflow when installed: 3-5 s in every process start.
    Hide MLflow during that import only; `import mlflow` afterwards works as usual."""
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # makes `import mlflow` raise ImportError
    try:
        import deepspeed
    finally:
        if hide:
            del sys.modules["mlflow"]
    return deepspeed


deepspeed = _import_deepspeed()
from deepspeed.accelerator import get_accelerator  # noqa: E402

# The shared-memory all-reduce op JIT-compiles for ~45 s on first use and leaks a /dev/shm buffer per rank;
# gloo does the job on CPU (../shared/notes/STACK.md).
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.utils.logger.setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*(reduce_scatter|all_gather_into)_tensor.* is deprecated")

SINGLE_PROCESS_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GLOO_SOCKET_IFNAME",
)
ENGINE_TAG = "state"  # DeepSpeed's sub-folder inside a checkpoint's engine/ folder


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class EngineSettings:
    """The effective engine settings after merging the config and the DeepSpeed JSON."""

    config: dict[str, Any]
    micro_batch: int  # rows per rank per forward
    grad_accum: int
    zero_stage: int
    precision: str
    client_optimizer: bool  # False when the JSON names an optimizer


def dist_info() -> DistInfo:
    """Rank, local rank and world size from the launcher's environment (one process when unset)."""
    return DistInfo(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def loopback_interface() -> str | None:
    """The name of the loopback network interface (`lo` on Linux, `lo0` on macOS), if there is one."""
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


@contextmanager
def distributed() -> Iterator[DistInfo]:
    """Join (or, without a launcher, create) the gloo process group; destroy it on exit if created here.

    Without a launcher the rank variables are set for one process with a free MASTER_PORT, and restored on
    exit, so several runs may follow each other in one interpreter.
    """
    saved = {k: os.environ.get(k) for k in SINGLE_PROCESS_ENV}
    store_dir, init = None, {}
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ["MASTER_ADDR"] = "127.0.0.1"  # DeepSpeed needs both to skip its MPI discovery
        os.environ["MASTER_PORT"] = str(free_port())
        # One process needs no network: torch's TCPStore listens on every interface whatever MASTER_ADDR
        # says, so a file store replaces it; gloo's own listener goes on the loopback interface.
        store_dir = tempfile.mkdtemp(prefix="sla-store-")
        init = {"init_method": f"file://{store_dir}/store", "rank": 0, "world_size": 1}
        loopback = loopback_interface()
        if loopback and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = loopback
    created = not tdist.is_initialized()  # a group the caller made is the caller's to destroy
    try:
        deepspeed.init_distributed(dist_backend="gloo", verbose=False, **init)
        yield dist_info()
    finally:
        # Without this, about 1 in 6 two-process ZeRO-3 runs aborted at exit (STACK.md). DeepSpeed's own
        # destroy also drops its cached groups, so a later run in this interpreter starts clean.
        if created and tdist.is_initialized():
            deepspeed.comm.destroy_process_group()
        if store_dir is not None:
            shutil.rmtree(store_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def read_ds_json(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config; errors name the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"train.deepspeed_config: {file} not found; see infra/deepspeed/ for examples"
        )
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"train.deepspeed_config: {file} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"train.deepspeed_config: {file} must hold a JSON object")
    return data


def _pick(name: str, from_file: Any, from_config: Any, explicit: bool, source: str) -> Any:
    """The file's value wins over a config default; a clash with an explicitly set value is an error."""
    if from_file is None:
        return from_config
    if explicit and from_file != from_config:
        raise ValueError(
            f"train.{name}={from_config!r} contradicts {source} ({from_file!r}); remove one of them"
        )
    return from_file


def _precision(base: dict[str, Any], train: TrainConfig, source: str) -> str:
    file_precision = "bf16" if (base.get("bf16") or {}).get("enabled") else None
    file_precision = "fp16" if (base.get("fp16") or {}).get("enabled") else file_precision
    precision = _pick(
        "precision", file_precision, train.precision, "precision" in train.model_fields_set, source
    )
    if precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise ValueError(
            f"train.precision=fp16 is not supported on {get_accelerator().device_name()}; use fp32 or bf16"
        )
    return precision


def build_settings(train: TrainConfig, world_size: int) -> EngineSettings:
    """The DeepSpeed config for `train` at `world_size` ranks.

    `train.batch_size` is the global batch per optimizer step: micro-batch x ranks x accumulation. A JSON
    file (`train.deepspeed_config`) may set the ZeRO stage, precision, optimizer, clipping and any other
    DeepSpeed key; its batch keys must agree with the config.

    Raises:
        ValueError: naming the key when values contradict or the batch does not divide.
    """
    source = str(train.deepspeed_config) if train.deepspeed_config else "the DeepSpeed JSON"
    base = read_ds_json(train.deepspeed_config) if train.deepspeed_config else {}
    explicit = train.model_fields_set
    if "scheduler" in base:
        raise ValueError(
            f"{source}: remove `scheduler`; the learning rate follows train.lr_warmup_steps and "
            "train.lr_schedule"
        )
    zero = dict(base.get("zero_optimization") or {})
    stage = int(_pick("zero_stage", zero.get("stage"), train.zero_stage, "zero_stage" in explicit, source))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{source}: zero_optimization.stage must be 0-3, got {stage}")
    precision = _precision(base, train, source)
    file_accum = base.get("gradient_accumulation_steps")
    accum = int(_pick("grad_accum", file_accum, train.grad_accum, "grad_accum" in explicit, source))
    if train.batch_size % (world_size * accum):
        raise ValueError(
            f"train.batch_size={train.batch_size} must be divisible by processes x grad_accum = "
            f"{world_size} x {accum}; change batch_size, grad_accum or the process count"
        )
    micro = train.batch_size // (world_size * accum)
    for key, want in (("train_batch_size", train.batch_size), ("train_micro_batch_size_per_gpu", micro)):
        if key in base and int(base[key]) != want:
            raise ValueError(
                f"{source}: {key}={base[key]} but train.batch_size={train.batch_size} on "
                f"{world_size} process(es) with grad_accum={accum} gives {want}; remove it"
            )
    zero["stage"] = stage
    config = {
        **base,
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "bf16": {**(base.get("bf16") or {}), "enabled": precision == "bf16"},
        "fp16": {**(base.get("fp16") or {}), "enabled": precision == "fp16"},
        "gradient_clipping": float(base.get("gradient_clipping", train.max_grad_norm)),
        "steps_per_print": base.get("steps_per_print", 10**9),
        "wall_clock_breakdown": base.get("wall_clock_breakdown", False),
    }
    if "optimizer" not in base and stage > 0:
        config.setdefault("zero_allow_untested_optimizer", True)
    return EngineSettings(config, micro, accum, stage, precision, client_optimizer="optimizer" not in base)


def initialize(model: nn.Module, settings: EngineSettings, param_groups: list[dict]) -> Any:
    """Wrap `model` in a DeepSpeed engine; the optimizer is a torch AdamW over `param_groups` unless the JSON
    names one (then DeepSpeed builds it over the same groups). Returns the engine."""
    optimizer = torch.optim.AdamW(param_groups) if settings.client_optimizer else None
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=None if optimizer else param_groups,
        config=settings.config,
    )
    return engine


@contextmanager
def gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Inside, ZeRO-3 partitioned `params` hold their full values on every rank (a no-op below stage 3).
    Every rank must enter it."""
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def adapter_params(model: nn.Module) -> list[nn.Parameter]:
    """The adapter, gate and head parameters (small: what counting the kept structure reads)."""
    return [p for n, p in model.named_parameters() if is_adapter_key(n)]


def save_engine(engine: Any, folder: Path) -> None:
    """DeepSpeed's optimizer and trainable-weight state (no frozen backbone weights). All ranks call it."""
    engine.save_checkpoint(str(folder), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)


def load_engine(engine: Any, folder: Path) -> None:
    """Restore what `save_engine` wrote. All ranks call it."""
    path, _ = engine.load_checkpoint(
        str(folder),
        tag=ENGINE_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if path is None:
        raise FileNotFoundError(f"{folder}: no DeepSpeed state under tag {ENGINE_TAG!r}")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (float64 on CPU, so small counts stay exact)."""
    out = values.detach().to(torch.float64).cpu()
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()
