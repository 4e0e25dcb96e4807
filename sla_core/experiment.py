"""The experiment YAML, validated once at the entry point into typed sections.

One file drives every stage: `backbone` and `tasks` (data), `sla` (the adapter structure and sparsity),
`train` (the engine), `tune` (the search), `registry` (MLflow promotion). Unknown keys are errors.
"""

from __future__ import annotations

import copy
import json
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sla_core.config import ACTIVATIONS, PathKind, Pooling, SLAConfig
from sla_core.data.builtin import builtin_task
from sla_core.data.spec import TaskSpec
from sla_core.gates import GATE_KINDS


class ExperimentConfigError(ValueError):
    """An invalid experiment config; `problems` holds one `key.path: why` line per bad key or value."""

    def __init__(self, problems: Sequence[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"{source}: invalid config" if source else "invalid config"
        super().__init__(head + "".join(f"\n  {p}" for p in self.problems))

    def at(self, source: str | Path) -> ExperimentConfigError:
        """The same problems, reported for `source` (the YAML file)."""
        return ExperimentConfigError(self.problems, str(source))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Section):
    """Optimisation and engine settings. `batch_size` is the global batch per optimizer step."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    gate_lr: float = Field(0.05, gt=0)
    # The noisy evaluations also on the model before pruning (clean is always evaluated: it shows that
    # pruning is exact). Off saves a third of the final evaluation.
    eval_noisy_before_pruning: bool = True
    weight_decay: float = Field(0.0, ge=0)
    lr_warmup_steps: int = Field(0, ge=0)
    # After the warm-up the learning rate decays linearly to zero at the last step, or stays constant.
    lr_schedule: Literal["linear", "constant"] = "linear"
    # Clip the global gradient norm to this value on every step (0 turns clipping off).
    max_grad_norm: float = Field(1.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    # At the decision, drop the closed adapter units from training (gradients, optimizer state, compute) and
    # train only the kept ones (ZeRO-0 fp32, the default engine; other engines keep them, masked). The
    # results are the same.
    compact: bool = True
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"  # auto: bf16 on a GPU, else fp32
    deepspeed_config: Path | None = None
    eval_every: int = Field(0, ge=0)
    eval_batch_size: int = Field(64, ge=1)
    checkpoint_every: int = Field(100, ge=0)
    log_every: int = Field(10, ge=1)
    sampling: Literal["proportional", "temperature"] = "proportional"
    sampling_temperature: float = Field(2.0, gt=0)
    seed: int = 0
    # Dropout inside the frozen backbone while training; None keeps the pretrained config's rates.
    backbone_dropout: float | None = Field(None, ge=0, lt=1)
    # Debug hook: make the loss NaN at this (1-based) step on rank 0, to exercise the non-finite-loss stop.
    debug_nan_at_step: int | None = Field(None, ge=1)


class TuneConfig(_Section):
    """Search space and scheduler for `sla tune` (see docs/tuning.md).

    Lists are choices (random search samples them, grid search crosses them); `lr` is a log-uniform range
    for random search, and `lr_grid` (default: its two ends and their geometric mean) its grid values.
    `extra_space` adds dimensions over any dotted config key, e.g. `{"train.gate_lr": [0.01, 0.05]}`.
    Steps, `grace_period` and `report_every` count optimizer steps of one trial.
    """

    search: Literal["random", "grid"] = "random"
    num_samples: int | None = Field(None, ge=1)  # random: trials (default 8); grid: repeats (default 1)
    seed: int = 0  # of the random search's sampler
    lambda_sparse: list[float] = Field([0.0, 0.1, 0.5, 1.0, 2.0, 5.0], min_length=1)
    rank: list[int] = Field([4, 8, 16, 32, 64], min_length=1)
    lr: tuple[float, float] = (3e-4, 3e-3)
    lr_grid: list[float] | None = Field(None, min_length=1)
    lambda_warmup_steps: list[int] = Field([0, 50], min_length=1)
    gate_init: list[float] = Field([3.0], min_length=1)
    extra_space: dict[str, list[Any]] = {}
    steps: int | None = Field(None, ge=1)  # per trial; default: train.steps
    scheduler: Literal["asha", "none"] = "asha"  # none: every trial runs all steps (the grid baseline)
    grace_period: int = Field(50, ge=1)
    reduction_factor: int = Field(3, ge=2)
    report_every: int = Field(25, ge=1)
    budget: float = Field(0.015, gt=0, lt=1)  # max trainable fraction of the backbone after pruning
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    # What ASHA ranks trials on at its rungs (default: `metric`). The validation loss separates trials
    # early, when most still sit at the same accuracy; the winner is still chosen on `metric`.
    scheduler_metric: str | None = None
    scheduler_mode: Literal["max", "min"] = "min"
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check_space(self) -> TuneConfig:
        lo, hi = self.lr
        if not 0 < lo <= hi:
            raise ValueError(f"tune.lr={list(self.lr)}: give [low, high] with 0 < low <= high")
        if any(v <= 0 for v in self.lr_grid or []):
            raise ValueError(f"tune.lr_grid={self.lr_grid}: learning rates must be > 0")
        if any(v < 0 for v in self.lambda_sparse):
            raise ValueError(
                f"tune.lambda_sparse={self.lambda_sparse}: values must be >= 0 (0 = no sparsity)"
            )
        if any(r < 1 for r in self.rank):
            raise ValueError(f"tune.rank={self.rank}: ranks must be >= 1 (the issue's range is 4 to 64)")
        if any(w < 0 for w in self.lambda_warmup_steps):
            raise ValueError(f"tune.lambda_warmup_steps={self.lambda_warmup_steps}: values must be >= 0")
        for key, values in self.extra_space.items():
            if "." not in key or not isinstance(values, list) or not values:
                raise ValueError(
                    f"tune.extra_space.{key}: give a dotted config key (e.g. train.gate_lr) "
                    "mapped to a non-empty list of choices"
                )
        return self


class RegistryConfig(_Section):
    """MLflow registration: the alias moves only when `metric` beats the current one by more than `margin`
    (higher is better with `mode: max`, lower with `min`). `experiment` defaults to the config's `name`."""

    model_name: str = Field("sla-adapters", pattern=r"^[A-Za-z0-9_.-]+$")
    alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    metric: str = Field("test_accuracy_mean", min_length=1)
    margin: float = Field(0.0, ge=0)
    mode: Literal["max", "min"] = "max"
    experiment: str | None = Field(None, min_length=1)


# Budget mode's defaults, and the mode of a config whose `sla:` section names neither `budget` nor
# `lambda_sparse`: a predictable size, 0.2 % of the backbone, and the method measured for a budget
# (docs/results/method_ablation/rt_topk, docs/results/pareto.md): LoRA-type rank units at every linear layer,
# a search over half the steps in which every forward runs exactly the budget's knapsack ranked by sensitivity
# (the kept target falling from everything to the budget over the first 150 steps), then the fixed structure
# trains.
# They fill only the keys that the section (or a method's options) leaves unset; λ mode keeps SLAConfig's.
DEFAULT_RECIPE: dict[str, Any] = {
    "budget": 0.002,
    "paths": ("lora",),
    "gate_unit": "rank",
    "gate": "sensitivity",
    "dense_fraction": 0.0,
    "search_fraction": 0.5,
    "lambda_warmup_steps": 150,
}
MODE_KEYS = ("budget", "lambda_sparse")


class SLASection(_Section):
    """The `sla:` section: `SLAConfig` without `tasks` (derived from `tasks:`). See `SLAConfig` for meanings;
    defaults and ranges are the same (a test holds them together), except the mode: a section that sets
    neither `budget` nor `lambda_sparse` gets `DEFAULT_RECIPE` (a budget) where it sets nothing itself; one
    that sets both runs the budget, λ unused (as `SLAConfig`). Setting one of them by an override (`--set`, a
    method option) drops the other."""

    rank: int = Field(8, ge=1, le=4096)
    pool_size: int = Field(1, ge=1, le=64)
    paths: tuple[PathKind, ...] = Field(("sequential", "parallel"), min_length=1)
    target_modules: str | list[str] | None = None
    activation: str = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)
    head_dropout: float = Field(0.1, ge=0, lt=1)
    pooling: Pooling = "auto"
    gate: str = "hard_concrete"
    gate_init: float = 3.0
    gate_temperature: float = Field(2.0 / 3.0, gt=0)
    lambda_sparse: float | None = Field(None, ge=0)  # None: see DEFAULT_RECIPE
    lambda_warmup_steps: int = Field(0, ge=0)
    budget: float | None = Field(None, gt=0, lt=1)
    dense_fraction: float = Field(0.0, ge=0, le=1)
    search_fraction: float = Field(1.0, ge=0, le=1)
    gate_unit: Literal["module", "rank"] = "module"
    decision: Literal["learned", "random", "magnitude"] = "learned"
    rewind: bool = False
    allow_empty: bool = False
    seed: int = 0
    extra: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _no_tasks(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tasks" in data:
            raise ValueError("tasks: is derived from the top-level `tasks:`; remove it here")
        return data

    @property
    def budget_mode(self) -> bool:
        """Whether the size comes from a budget (set, or `DEFAULT_RECIPE`'s) rather than λ."""
        return self.resolved()["budget"] is not None

    def resolved(self, **overrides: Any) -> dict[str, Any]:
        """The `SLAConfig` keys: this section's values under `overrides` (a method's options).

        A mode key in `overrides` replaces the section's mode. In budget mode (a budget set, or neither mode
        key named) `DEFAULT_RECIPE` fills the keys that neither sets, and λ (unused) keeps `SLAConfig`'s
        default; an explicit `budget: null` without λ is λ mode at `SLAConfig`'s λ."""
        values = {**self.model_dump(), **overrides}
        if "lambda_sparse" in overrides and "budget" not in overrides:
            values["budget"] = None
        elif overrides.get("budget") is not None and "lambda_sparse" not in overrides:
            values["lambda_sparse"] = None
        given = self.model_fields_set | set(overrides)
        if values["lambda_sparse"] is None and (values["budget"] is not None or "budget" not in given):
            values.update({k: v for k, v in DEFAULT_RECIPE.items() if k not in given})
        if values["lambda_sparse"] is None:
            del values["lambda_sparse"]
        return values

    @field_validator("paths")
    @classmethod
    def _distinct_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"paths must not repeat, got {list(value)}")
        return value

    @field_validator("target_modules")
    @classmethod
    def _regex_compiles(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{value!r} is not a valid regex ({err})") from None
        return value

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, value: str) -> str:
        if value not in ACTIVATIONS:
            raise ValueError(f"unknown activation {value!r}; choose one of {', '.join(ACTIVATIONS)}")
        return value

    @field_validator("gate")
    @classmethod
    def _known_gate(cls, value: str) -> str:
        if value not in GATE_KINDS:  # the gate registry: a registered kind is accepted here too
            raise ValueError(f"unknown gate kind {value!r}; choose one of {', '.join(sorted(GATE_KINDS))}")
        return value


class ExperimentConfig(_Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    # An alias, a hub name, a local folder, a `.gguf` file, or a mapping `{path: <folder or hub repo>,
    # gguf_file: <name>.gguf}`, checked now and kept as the one string `load_backbone` reads.
    backbone: str = "minilm"
    # What trains: `sla` (ours) or a baseline such as `lora:r=8` or `full_ft:lr=1e-4` (sla_core/methods).
    method: str = "sla"
    tasks: list[TaskSpec] = Field(min_length=1)
    sla: SLASection = SLASection()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    registry: RegistryConfig = RegistryConfig()
    output_dir: Path | None = None
    cache_dir: Path = Path("data/cache")

    @field_validator("backbone", mode="before")
    @classmethod
    def _backbone_mapping(cls, value: Any) -> Any:
        from sla_core.backbones import backbone_from_mapping

        return backbone_from_mapping(value) if isinstance(value, Mapping) else value

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        self.sla_config({t.name: 2 for t in self.tasks})  # validate the sla section early
        self.training_method()  # an unknown method or option is an error here, before any work
        return self

    def training_method(self) -> Any:
        """The `Method` that `method` names (sla_core.methods)."""
        from sla_core.methods import parse_method

        return parse_method(self.method)

    @property
    def run_dir(self) -> Path:
        return self.output_dir or Path("runs") / self.name

    def resolved_sla(self) -> dict[str, Any]:
        """The `sla:` keys as the run uses them (JSON-ready): the section under the method's own options, with
        the budget recipe's keys filled in where it applies. A plain `model_dump` shows the section's unset
        defaults instead, which the recipe replaces, so a dump written with it would build another model."""
        method = self.training_method()
        options = {**getattr(method, "options", {}), **(method.fixed() if hasattr(method, "fixed") else {})}
        values = self.sla.resolved(**options)
        return json.loads(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}))

    def resolved_dump(self) -> dict[str, Any]:
        """`model_dump(mode="json")` with the `sla:` section as it runs (`resolved_sla`): a config that, given
        to `sla train` again, builds the same model."""
        return {**self.model_dump(mode="json"), "sla": self.resolved_sla()}

    def sla_config(self, num_labels: dict[str, int] | None = None, **overrides: Any) -> SLAConfig:
        """The SLAConfig for these tasks; `num_labels` defaults to the declared label sets."""
        if num_labels is None:
            num_labels = {t.name: len(task_labels(t)) for t in self.tasks}
        return SLAConfig(tasks=num_labels, **self.sla.resolved(**overrides))


def task_labels(task: TaskSpec) -> list[str]:
    """Declared labels of a task (builtins know theirs)."""
    if task.labels is not None:
        return list(task.labels)
    if task.source == "builtin":
        return list(builtin_task(task.builtin or task.name).labels)
    raise ValueError(f"task {task.name!r}: declare `labels:` or prepare the data first to learn them")


def load_experiment(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML, with dotted-key `overrides` (`--set`) applied first.

    Raises:
        FileNotFoundError: no such file.
        ExperimentConfigError: (a ValueError) naming the file and every bad key path, override or value.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config {file} not found; see configs/ for examples")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ExperimentConfigError([f"not valid YAML: {err}"], str(file)) from None
    if not isinstance(data, dict):
        raise ExperimentConfigError(["the top level must be a mapping of sections"], str(file))
    try:
        return with_overrides(data, overrides or {})
    except ExperimentConfigError as err:
        raise err.at(file) from None


def with_overrides(
    cfg_or_data: ExperimentConfig | Mapping[str, Any], overrides: Mapping[str, Any], *, origin: str = "--set"
) -> ExperimentConfig:
    """A validated config: `cfg_or_data` (a config, or the raw YAML mapping) with dotted keys set.

    The one override path (`--set`, the search space, the flow's best trial). Keys reach nested sections and
    list items (`tasks.0.max_length`); a key under a mapping field takes the rest of the path whole
    (`tune.extra_space.train.gate_lr`). Only keys set in `cfg_or_data` or here count as set.

    Raises:
        ExperimentConfigError: naming the override (`{origin} key`) for an unknown key or an index out of
            range, and the key path of every invalid value.
    """
    if isinstance(cfg_or_data, ExperimentConfig):
        data = cfg_or_data.model_dump(mode="json", exclude_unset=True)
    else:
        data = copy.deepcopy(dict(cfg_or_data))
    problems = []
    set_mode = [k for k in MODE_KEYS if f"sla.{k}" in overrides]
    if len(set_mode) == 1 and isinstance(data.get("sla"), dict):
        # setting one mode key (a budget, or λ) drops the other: the override says which mode to run
        other = MODE_KEYS[1 - MODE_KEYS.index(set_mode[0])]
        data["sla"] = {k: v for k, v in data["sla"].items() if k != other}
    for dotted, value in overrides.items():
        try:
            _set_dotted(data, dotted, value, origin)
        except ExperimentConfigError as err:
            problems += err.problems
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ExperimentConfigError(problems + _problems(err)) from None
    if problems:
        raise ExperimentConfigError(problems)
    return cfg


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`key.path=value` strings into a dict; values are read as YAML (numbers, booleans, lists, null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({err})") from err
    return out


# What a field holds, to walk dotted keys: ("model", cls), ("list", item), ("dict", None), ("leaf", None).
_Shape = tuple[str, Any]


def _shape(annotation: Any) -> _Shape:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        shapes = [_shape(a) for a in get_args(annotation) if a is not type(None)]
        return next((sh for sh in shapes if sh[0] != "leaf"), ("leaf", None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("model", annotation)
    if origin in (list, tuple):
        return ("list", (get_args(annotation) or (Any,))[0])
    if origin is dict or annotation is dict:
        return ("dict", None)
    return ("leaf", None)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")

    def bad(why: str) -> ExperimentConfigError:
        return ExperimentConfigError([f"{origin} {dotted}: {why}"])

    if not all(parts):
        raise bad("empty key; write dotted keys like train.steps or tasks.0.max_length")
    node: Any = data
    shape: _Shape = ("model", ExperimentConfig)
    for i, part in enumerate(parts):
        where, last = ".".join(parts[:i]), i == len(parts) - 1
        kind, inner = shape
        if kind == "dict":
            node[".".join(parts[i:])] = value  # mapping keys may hold dots (tune.extra_space)
            return
        if kind == "list":
            n = len(node)
            if not part.isdigit() or int(part) >= n:
                has = f"the config has {n} {where}" if "." not in where else f"{where} has {n} items"
                raise bad(f"{has} ({f'0..{n - 1}' if n else 'none to index'})")
            key: str | int = int(part)
            shape = _shape(inner)
        else:
            if part not in inner.model_fields:
                section = f"in section {where}" if where else "at the top level"
                raise bad(f"unknown key {part!r} {section}; known: {', '.join(inner.model_fields)}")
            key = part
            shape = _shape(inner.model_fields[part].annotation)
        if last:
            node[key] = value
            return
        if shape[0] == "leaf":
            raise bad(f"{'.'.join(parts[: i + 1])} is a value, not a section")
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None:
            child = [] if shape[0] == "list" else {}
            node[key] = child
        if not isinstance(child, list if shape[0] == "list" else dict):
            raise bad(f"{'.'.join(parts[: i + 1])} is {child!r} in the config, not a {shape[0]}")
        node = child


def _walk(loc: Sequence[str | int]) -> tuple[list[str | int], _Shape]:
    """The key path of a pydantic error location without union tags (`str`, `list[str]`), and its shape."""
    path: list[str | int] = []
    shape: _Shape = ("model", ExperimentConfig)
    for n, part in enumerate(loc):
        kind, inner = shape
        if kind == "list" and isinstance(part, int):
            shape = _shape(inner)
        elif kind == "model" and part in inner.model_fields:
            shape = _shape(inner.model_fields[part].annotation)
        elif kind == "dict" or kind == "model":  # a mapping's keys, or an unknown key: kept as written
            return [*path, *loc[n:]], ("leaf", None)
        else:
            break
        path.append(part)
    return path, shape


def _problems(err: ValidationError) -> list[str]:
    """One `key.path: why` line per key; an unknown key lists the known ones, a bad value is shown."""
    problems: dict[str, list[str]] = {}
    for e in err.errors():
        path, _ = _walk(e["loc"])
        if e["type"] == "extra_forbidden":
            _, (kind, section) = _walk(e["loc"][:-1])
            known = list(section.model_fields) if kind == "model" else []
            why = "unknown key" + (f"; known keys are {', '.join(known)}" if known else "")
        else:
            why = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("value_error", "missing") and not isinstance(e.get("input"), dict | list):
                why += f", got {e.get('input')!r}"
        problems.setdefault(".".join(str(x) for x in path), []).append(why)
    return [f"{path}: {' | '.join(whys)}" if path else " | ".join(whys) for path, whys in problems.items()]
