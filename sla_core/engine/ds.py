"""The DeepSpeed boundary: the only module of the project that imports deepspeed.

It chooses the device once (`choose_device`: the local CUDA device with NCCL, else the CPU with gloo),
builds the DeepSpeed config from `TrainConfig` (optionally over a JSON file such as
`infra/deepspeed/zero3.json`), sets up the process group (one process without a launcher included),
builds backbones partitioned under ZeRO-3 (`construction`), wraps the model in an engine, and gathers
ZeRO-3 partitioned parameters for saving.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from sla_core.adapters import is_adapter_key
from sla_core.backbones import Assign, assign_whole
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

# ZeRO-3 settings the engine adds on the CPU when the config leaves them unset (`build_settings`). There the
# shards and whatever is gathered share the host's memory with everything else: fetch one module's
# parameters at a time, each into its own buffer (the coalesced fetch gathers into a flat buffer and then
# copies every parameter out of it: twice the size), release them after use and prefetch little. A
# DeepSpeed JSON's keys win; on a GPU DeepSpeed's own defaults apply.
ZERO3_CPU_DEFAULTS: dict[str, Any] = {
    "stage3_allgather_sequential": True,
    "stage3_max_live_parameters": 2 * 10**7,
    "stage3_max_reuse_distance": 0,
    "stage3_prefetch_bucket_size": 0,
}
# Decoders whose `forward(inputs_embeds=E)` equals `forward(input_ids=I)` with E the embedding of I (nothing
# else reads the ids): their partitioned embedding is read shard-wise, never gathered
# (`shard_input_embeddings`).
SHARDED_LOOKUP_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
LOOKUP_CHUNK_BYTES = 16 * 2**20  # rows all-reduced at once by `sharded_lookup`

SINGLE_PROCESS_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GLOO_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
)
ENGINE_TAG = "state"  # DeepSpeed's sub-folder inside a checkpoint's engine/ folder


@dataclass(frozen=True)
class Device:
    """Where this process computes, chosen once at start: the local CUDA device with NCCL, or the CPU
    with gloo. Models and batches go to `torch_device`; collectives use `backend`."""

    type: str  # "cuda" | "cpu"
    index: int | None = None
    backend: str = "gloo"  # "nccl" | "gloo"
    bf16: bool = False  # bf16 kernels exist here (precision `auto` picks bf16 then)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.index is not None else torch.device(self.type)

    def __str__(self) -> str:
        return str(self.torch_device)


CPU = Device("cpu")


def choose_device(local_rank: int = 0, accelerator: str | None = None) -> Device:
    """The local CUDA device `cuda:{local_rank}` when DeepSpeed's accelerator is CUDA and torch sees a GPU,
    else the CPU. `DS_ACCELERATOR=cpu` (DeepSpeed's own variable) forces the CPU on a GPU machine.

    Args:
        accelerator: the accelerator's name; DeepSpeed's detected one (`get_accelerator()`) when None.
    Raises:
        ValueError: more processes on this node than GPUs.
    """
    name = accelerator if accelerator is not None else get_accelerator().device_name()
    if name != "cuda" or not torch.cuda.is_available():
        return CPU
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"local rank {local_rank} has no GPU: this node has {count}; start at most {count} processes "
            "per node (--nproc), or set DS_ACCELERATOR=cpu to train on the CPU"
        )
    return Device("cuda", local_rank, "nccl", bf16=torch.cuda.is_bf16_supported())


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job, and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: Device = CPU

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


def dist_info(device: Device = CPU) -> DistInfo:
    """Rank, local rank and world size from the launcher's environment (one process when unset)."""
    return DistInfo(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        device,
    )


def loopback_interface() -> str | None:
    """The name of the loopback network interface (`lo` on Linux, `lo0` on macOS), if there is one."""
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


@contextmanager
def distributed() -> Iterator[DistInfo]:
    """Choose the device (`choose_device`), then join (or, without a launcher, create) the process group
    on its backend (NCCL on CUDA, gloo on the CPU); destroy the group on exit if created here.

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
        # says, so a file store replaces it; gloo's and NCCL's own listeners go on the loopback interface.
        store_dir = tempfile.mkdtemp(prefix="sla-store-")
        init = {"init_method": f"file://{store_dir}/store", "rank": 0, "world_size": 1}
        loopback = loopback_interface()
        for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if loopback and key not in os.environ:
                os.environ[key] = loopback
    created = not tdist.is_initialized()  # a group the caller made is the caller's to destroy
    device = choose_device(int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device.torch_device)  # before NCCL starts, so each rank owns its GPU
    try:
        deepspeed.init_distributed(dist_backend=device.backend, verbose=False, **init)
        yield dist_info(device)
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


def _precision(base: dict[str, Any], train: TrainConfig, source: str, device: Device) -> str:
    """fp32, bf16 or fp16; `auto` is bf16 where the device has bf16 kernels (CUDA), else fp32."""
    file_precision = "bf16" if (base.get("bf16") or {}).get("enabled") else None
    file_precision = "fp16" if (base.get("fp16") or {}).get("enabled") else file_precision
    wanted, explicit = train.precision, "precision" in train.model_fields_set
    if wanted == "auto":
        wanted, explicit = ("bf16" if device.bf16 else "fp32"), False
    precision = _pick("precision", file_precision, wanted, explicit, source)
    if precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise ValueError(
            f"train.precision=fp16 is not supported on {get_accelerator().device_name()}; use fp32 or bf16"
        )
    return precision


def build_settings(train: TrainConfig, world_size: int, device: Device | None = None) -> EngineSettings:
    """The DeepSpeed config for `train` at `world_size` ranks on `device` (`choose_device()` when None).

    `train.batch_size` is the global batch per optimizer step: micro-batch x ranks x accumulation. A JSON
    file (`train.deepspeed_config`) may set the ZeRO stage, precision, optimizer, clipping and any other
    DeepSpeed key; its batch keys must agree with the config. `train.precision: auto` is bf16 on a GPU
    with bf16 kernels and fp32 on the CPU.

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
    device = device or choose_device()
    precision = _precision(base, train, source, device)
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
    if stage == 3 and device.type == "cpu":
        zero = {**ZERO3_CPU_DEFAULTS, **zero}
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


@contextmanager
def construction(settings: EngineSettings) -> Iterator[Assign]:
    """Load or build backbones inside this context. Under ZeRO-3 transformers' `from_pretrained` and
    `from_config` then build the model inside `deepspeed.zero.Init` with this config: each module's
    parameters are partitioned across the ranks as soon as the module exists, and checkpoint weights are
    copied into the shards (rank 0 reads the file), so no rank ever holds the whole model. Below stage 3
    it does nothing. Every rank must enter it (partitioning is collective).

    Yields the `Assign` that writes parameter values here (`load_backbone(..., assign=)`): under ZeRO-3 one
    parameter is gathered at a time, written on rank 0 and scattered back into the shards. Adapters, gates
    and heads are built after this context, whole; `initialize` partitions them.
    """
    if settings.zero_stage != 3:
        yield assign_whole
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # transformers keeps only a weak reference to this object: it must stay referenced while models load.
    hf_config = HfDeepSpeedConfig(settings.config)
    try:
        yield assign_partitioned
    finally:
        unset_hf_deepspeed_config()
        del hf_config


class _Works:
    """The handle of several asynchronous collectives: `wait()` waits for all."""

    def __init__(self, works: list[Any]) -> None:
        self.works = works

    def wait(self, *_: Any) -> bool:
        for work in self.works:
            work.wait()
        self.works = []
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


def _gathers_in_place(output: torch.Tensor, shard: torch.Tensor, group: Any) -> bool:
    """Whether `_gather_in_place` handles this all-gather: gloo, on the CPU, flat sizes that match."""
    return (
        tdist.is_initialized()
        and tdist.get_backend(group) == "gloo"
        and tdist.get_world_size(group) > 1
        and output.device.type == "cpu"
        and shard.device.type == "cpu"
        and output.dtype == shard.dtype
        and output.is_contiguous()
        and shard.is_contiguous()
        and output.numel() == shard.numel() * tdist.get_world_size(group)
    )


def _gather_in_place(output: torch.Tensor, shard: torch.Tensor, group: Any = None) -> _Works:
    """All-gather `shard` from every rank of `group` into `output` (rank i's shard in `output`'s i-th slice)
    as one broadcast per rank straight into `output`'s slices; returns the pending work.

    Torch's gloo all-gather receives into a second buffer of the full size and copies it out: gathering a
    384 MB parameter on 2 ranks peaked at +769 MB, these broadcasts at +432 MB (`_gathers_in_place` says
    when it applies)."""
    group = group if group is not None else tdist.group.WORLD
    n, world, rank = shard.numel(), tdist.get_world_size(group), tdist.get_rank(group)
    flat = output.view(-1)
    mine = flat.narrow(0, rank * n, n)
    if mine.data_ptr() != shard.data_ptr():  # DeepSpeed's coalesced fetch passes its own slice
        mine.copy_(shard.view(-1))
    return _Works([
        tdist.broadcast(
            flat.narrow(0, i * n, n), src=tdist.get_global_rank(group, i), group=group, async_op=True
        )
        for i in range(world)
    ])  # fmt: skip


def _install_in_place_gathers() -> None:
    """Route DeepSpeed's all-gathers (ZeRO-3 parameter fetches, `GatheredParameters`) through
    `_gather_in_place` where it applies (gloo on the CPU); the rest go to DeepSpeed's own."""
    comm = deepspeed.comm
    if getattr(comm.allgather_fn, "sla_in_place", False):
        return
    allgather_fn, all_gather_into_tensor = comm.allgather_fn, comm.all_gather_into_tensor

    def allgather(output_tensor, input_tensor, group=None, async_op=False, **kwargs):  # noqa: ANN001, ANN202
        if not _gathers_in_place(output_tensor, input_tensor, group):
            return allgather_fn(output_tensor, input_tensor, group=group, async_op=async_op, **kwargs)
        work = _gather_in_place(output_tensor, input_tensor, group)
        return work if async_op else work.wait() and None

    def into_tensor(output_tensor, tensor, group=None, async_op=False, **kwargs):  # noqa: ANN001, ANN202
        if not _gathers_in_place(output_tensor, tensor, group):
            return all_gather_into_tensor(output_tensor, tensor, group=group, async_op=async_op, **kwargs)
        work = _gather_in_place(output_tensor, tensor, group)
        return work if async_op else work.wait() and None

    allgather.sla_in_place = True  # type: ignore[attr-defined]
    comm.allgather_fn, comm.all_gather_into_tensor = allgather, into_tensor


_install_in_place_gathers()


def assign_partitioned(param: nn.Parameter, fill: Callable[[torch.Tensor], None]) -> None:
    """Fill a ZeRO-3 parameter gathered whole on rank 0, then scatter it into the shards (one parameter at a
    time); every rank calls it."""
    if not is_partitioned(param):
        assign_whole(param, fill)
        return
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
        if tdist.get_rank() == 0:
            fill(param.data)


def is_partitioned(param: nn.Parameter) -> bool:
    """Whether `param` is a ZeRO-3 parameter (its full size is `ds_numel`, this rank's shard `ds_tensor`)."""
    return hasattr(param, "ds_id")


def sharded_lookup(weight: nn.Parameter, ids: torch.Tensor) -> torch.Tensor:
    """`weight[ids]` (an embedding lookup) for a ZeRO-3 partitioned `weight`, never gathering it: each rank
    copies the rows (or parts of rows) of the looked-up tokens its own flat shard holds into a zero buffer,
    and one all-reduce (sum) completes them; every element comes from one rank and zeros from the others,
    so the result is exact. Ranks look up different ids: all share their ids first, and every rank serves
    all of them, `LOOKUP_CHUNK_BYTES` of rows per all-reduce. Every rank of the weight's group calls it.

    Returns: (*ids.shape, hidden) in the shard's dtype, on the device the collectives use.
    """
    group = weight.ds_process_group
    world, rank = tdist.get_world_size(group), tdist.get_rank(group)
    shard = weight.ds_tensor.view(-1)
    vocab, hidden = (int(d) for d in weight.ds_shape)
    device = torch.device(get_accelerator().current_device_name())  # where collectives run
    local = ids.reshape(-1).to(device=device, dtype=torch.long)
    # Share the ids (padded to the longest rank's, padding marked -1) and look up their union.
    count = torch.tensor([local.numel()], device=device)
    counts = torch.empty(world, dtype=torch.long, device=device)
    tdist.all_gather_into_tensor(counts, count, group=group)
    width = int(counts.max())
    padded = torch.full((width,), -1, dtype=torch.long, device=device)
    padded[: local.numel()] = local
    everyone = torch.empty(world * width, dtype=torch.long, device=device)
    tdist.all_gather_into_tensor(everyone, padded, group=group)
    rows = torch.unique(everyone[everyone >= 0])  # sorted, the same on every rank
    if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= vocab):
        raise IndexError(f"token ids must lie in [0, {vocab}); got {int(rows[0])}..{int(rows[-1])}")
    where = torch.searchsorted(rows, local)  # each local id's row in `rows`
    out = torch.empty(local.numel(), hidden, dtype=shard.dtype, device=device)
    # This rank holds the flat elements [start, end) of the weight (the last shard may be padded); the rows
    # that lie wholly inside are the rows of `table`, a view of the shard (`offset`: where its first row is).
    start = rank * shard.numel()
    size = min(shard.numel(), vocab * hidden - start)
    offset = (-start) % hidden
    table = shard.narrow(0, offset, max(0, size - offset) // hidden * hidden).view(-1, hidden)
    step = max(1, LOOKUP_CHUNK_BYTES // (hidden * shard.element_size()))
    for first in range(0, rows.numel(), step):
        chunk = rows[first : first + step].cpu()
        buffer = torch.zeros(chunk.numel(), hidden, dtype=shard.dtype, device=device)
        begin = chunk * hidden - start  # each row's offset in the shard (negative: it starts before it)
        whole = (begin >= 0) & (begin + hidden <= size)
        if bool(whole.any()):
            picked = table.index_select(0, ((begin[whole] - offset) // hidden).to(table.device))
            buffer[whole.to(device)] = picked.to(device)
        for i in torch.nonzero(~whole & (begin < size) & (begin + hidden > 0)).flatten().tolist():
            at = int(begin[i])  # a row split between two shards: this rank's part of it
            lo, hi = max(0, -at), min(hidden, size - at)
            buffer[i, lo:hi] = shard[at + lo : at + hi].to(device)
        tdist.all_reduce(buffer, group=group)
        mine = (where >= first) & (where < first + chunk.numel())
        out[mine] = buffer[where[mine] - first]
    return out.view(*ids.shape, hidden)


def _lookup_hook(weight: nn.Parameter, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """A forward pre-hook: `input_ids` become `inputs_embeds` looked up shard-wise (`sharded_lookup`).

    It holds the weight itself: reading `embedding.weight` during a forward would make DeepSpeed gather it
    and keep it whole as an "external parameter" of the running module until that module ends."""
    if kwargs.get("inputs_embeds") is not None:
        return None
    if kwargs.get("input_ids") is not None:
        ids, kwargs = kwargs["input_ids"], {**kwargs, "input_ids": None}
    elif args and torch.is_tensor(args[0]):
        ids, args = args[0], (None, *args[1:])
    else:
        return None
    kwargs["inputs_embeds"] = sharded_lookup(weight, ids).to(ids.device)
    return args, kwargs


def shard_input_embeddings(model: nn.Module) -> list[nn.Module]:
    """Under ZeRO-3, make the decoders inside `model` (`SHARDED_LOOKUP_MODEL_TYPES`) look their tokens up in
    the partitioned embedding (`sharded_lookup`) instead of gathering it whole every forward: a forward
    pre-hook turns `input_ids` into `inputs_embeds`, so the embedding module never runs and DeepSpeed never
    fetches its weight. It applies to a plain, frozen, partitioned `nn.Embedding` that nothing else hooks
    (an adapter on it would be skipped otherwise). Returns the hooked modules."""
    hooked = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "model_type", None) not in SHARDED_LOOKUP_MODEL_TYPES:
            continue
        if not callable(getattr(module, "get_input_embeddings", None)):
            continue
        try:
            embedding = module.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        weight = getattr(embedding, "weight", None)
        if (
            type(embedding) is not nn.Embedding
            or embedding.max_norm is not None
            or embedding._forward_hooks
            or embedding._forward_pre_hooks
            or weight is None
            or not is_partitioned(weight)
            or weight.requires_grad
            or getattr(weight, "ds_persist", False)  # kept whole on every rank anyway
            or getattr(weight, "nvme_swapper", None) is not None  # the shard may not be in memory
            or "inputs_embeds" not in inspect.signature(module.forward).parameters
            or any(getattr(h, "func", None) is _lookup_hook for h in module._forward_pre_hooks.values())
        ):
            continue
        module.register_forward_pre_hook(partial(_lookup_hook, weight), with_kwargs=True)
        hooked.append(module)
    return hooked


def _place_whole_parts(model: nn.Module, settings: EngineSettings, device: Device) -> None:
    """A model whose backbone was built partitioned (`construction`) is left where it is by DeepSpeed,
    which expects zero.Init to have placed and cast everything. The parts built whole (adapters, gates,
    heads, buffers: on the CPU, fp32) move to `device` and take the engine's dtype here."""
    params = list(model.parameters())
    if settings.zero_stage != 3 or not any(is_partitioned(p) for p in params):
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
    target = device.torch_device
    for p in params:
        if not is_partitioned(p):
            p.data = p.data.to(target, dtype=dtype if dtype is not None and p.is_floating_point() else None)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != target:
                module._buffers[name] = buf.to(target)


def initialize(
    model: nn.Module, settings: EngineSettings, param_groups: list[dict], device: Device = CPU
) -> Any:
    """Wrap `model` in a DeepSpeed engine on `device`; the optimizer is a torch AdamW over `param_groups`
    unless the JSON names one (then DeepSpeed builds it over the same groups). Returns the engine."""
    _place_whole_parts(model, settings, device)
    if settings.zero_stage == 3:
        shard_input_embeddings(model)
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
    """Element-wise sum over ranks, returned as float64 on the CPU (so small counts stay exact)."""
    out = values.detach().to(torch.float64).cpu()
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        if tdist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            on_gpu = out.to(torch.device("cuda", torch.cuda.current_device()))
            tdist.all_reduce(on_gpu, op=tdist.ReduceOp.SUM)
            return on_gpu.cpu()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()
