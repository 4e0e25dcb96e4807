"""Typed task descriptions: one `TaskSpec` drives preparation, training and evaluation.

Noise ratios have exact meanings, and `sla_core.data.noise` measures exactly these:
- `char`: character operations per alphanumeric character (each operation changes one target character:
  neighbouring-key substitution, OCR confusion, insertion after it, deletion, transposition with the next).
- `word`: word operations per whitespace-separated word (drop it, swap it with the next word, or replace it
  with a random word from the same split's vocabulary).
- `label`: fraction of training rows whose label is flipped to a different label (training data only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sla_core.data.builtin import builtin_names, builtin_task
from sla_core.data.errors import ConfigError

SPLITS: tuple[str, str, str] = ("train", "validation", "test")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NoiseKind = Literal["char+word", "word", "char"]


class NoiseSpec(_Strict):
    """Controlled noise: each kind has its own ratio in [0, 1]; deterministic for `seed`."""

    char: float = Field(0.0, ge=0.0, le=1.0)
    word: float = Field(0.0, ge=0.0, le=1.0)
    label: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 0

    @property
    def is_zero(self) -> bool:
        return self.char == 0 and self.word == 0 and self.label == 0

    @classmethod
    def of_kind(cls, kind: str, level: float, seed: int = 0) -> NoiseSpec:
        """`level` applied as `kind` ("char+word", "word" or "char"); labels stay clean."""
        if kind not in ("char+word", "word", "char"):
            raise ValueError(f"noise kind {kind!r}: choose char+word, word or char")
        return cls(char=level if kind != "word" else 0.0, word=level if kind != "char" else 0.0, seed=seed)


class HubSplits(_Strict):
    """Split names in the hub dataset; a split set to null is carved from train."""

    train: str = "train"
    validation: str | None = "validation"
    test: str | None = "test"


class HubSource(_Strict):
    """A Hugging Face hub dataset (or a local dataset folder) loaded with `datasets.load_dataset`."""

    path: str
    config: str | None = None
    splits: HubSplits = HubSplits()
    revision: str | None = None


class LocalFiles(_Strict):
    """Local CSV/TSV, JSON Lines or Parquet files (format from the extension; .gz/.bz2 allowed).

    A CSV/TSV file's first row is its header, unless `columns` names its columns in order (then every row is
    data, and `header: false` may say so too).
    """

    train: Path
    validation: Path | None = None
    test: Path | None = None
    encoding: str = "utf-8"  # relative paths are relative to the working directory
    header: bool = True
    columns: list[str] | None = None

    @model_validator(mode="after")
    def _check_header(self) -> LocalFiles:
        if self.columns is not None:
            if "header" in self.model_fields_set and self.header:
                raise ValueError(
                    "`columns:` names the columns of a file without a header row; drop `header: true` "
                    "(a file with a header names its own columns) or drop `columns:`"
                )
            if not self.columns or len(set(self.columns)) != len(self.columns):
                raise ValueError(
                    f"`columns:` must be distinct names, one per column in order, got {self.columns}"
                )
        elif not self.header:
            raise ValueError(
                "`header: false` needs `columns:` naming the file's columns in order, e.g. "
                "`columns: [label, text]`"
            )
        return self

    @property
    def has_header(self) -> bool:
        return self.columns is None


class ValidationPolicy(_Strict):
    """What to do with bad rows: `error` fails on the first report; `skip` drops them up to a fraction."""

    policy: Literal["error", "skip"] = "error"
    max_skip_fraction: float = Field(0.05, ge=0.0, le=1.0)


class TaskSpec(_Strict):
    """One labelled text-classification task (single text or text pair).

    Missing validation/test splits are carved from train, seeded by `split_seed`, keeping each group
    (movie for rotten_tomatoes, identical text otherwise) in one split.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    source: Literal["builtin", "hub", "local"] = "builtin"
    builtin: str | None = None
    hub: HubSource | None = None
    files: LocalFiles | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None
    max_length: int = Field(128, ge=4, le=32768)
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    validation: ValidationPolicy = ValidationPolicy()
    train_noise: NoiseSpec = NoiseSpec()
    eval_noise_levels: list[float] = [0.0, 0.05, 0.10, 0.15, 0.20]
    # Which noise each level > 0 applies to the test copies: char and word operations at the level (the
    # default), word operations only, or character operations only; each kind is one more pass per level.
    eval_noise_kinds: list[NoiseKind] = Field(["char+word"], min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _infer_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and "source" not in data:
            if data.get("hub") is not None:
                data = {**data, "source": "hub"}
            elif data.get("files") is not None:
                data = {**data, "source": "local"}
        return data

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v) for v in value]
        return value

    @field_validator("eval_noise_levels")
    @classmethod
    def _levels_in_range(cls, value: list[float]) -> list[float]:
        bad = [v for v in value if not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(f"eval_noise_levels must lie in [0, 1], got {bad}")
        return value

    @model_validator(mode="after")
    def _check_source(self) -> TaskSpec:
        if self.source == "builtin":
            name = self.builtin or self.name
            if name not in builtin_names():
                raise ValueError(
                    f"unknown builtin task {name!r}; choose one of {builtin_names()} "
                    "or set source: hub / local"
                )
            if self.hub is not None or self.files is not None:
                raise ValueError("source: builtin takes no `hub:` or `files:`; set source: hub or local")
            labels = list(builtin_task(name).labels)
            if self.labels is not None and self.labels != labels:
                raise ValueError(f"builtin {name!r} has labels {labels}; remove `labels:`")
        elif self.source == "hub" and self.hub is None:
            raise ValueError("source: hub needs `hub: {path, config, splits}`")
        elif self.source == "local" and self.files is None:
            raise ValueError("source: local needs `files: {train, validation?, test?}`")
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)):
            raise ValueError(f"labels must be at least two distinct names, got {self.labels}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) <= 0:
            raise ValueError(f"split_fractions must be positive and sum to 1, got {self.split_fractions}")
        return self

    @property
    def builtin_name(self) -> str | None:
        return (self.builtin or self.name) if self.source == "builtin" else None

    @property
    def declared_labels(self) -> list[str] | None:
        """The declared label set (builtins always have one)."""
        name = self.builtin_name
        return list(builtin_task(name).labels) if name else self.labels


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem: `where: key.path: message`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"]).replace(".[", "[")
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}")
    return "\n".join(lines)


def load_tasks_from_yaml(path: str | Path) -> tuple[str | None, list[TaskSpec]]:
    """Read `backbone:` and `tasks:` (a list of TaskSpec mappings) from a YAML file.

    Returns:
        (backbone or None, task specs). Other top-level keys are left to the experiment config.
    Raises:
        ConfigError: naming the file and the key path of each problem.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read YAML ({err}); fix the file or the path") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty `tasks:` list of task mappings")
    specs: list[TaskSpec] = []
    for i, item in enumerate(doc["tasks"]):
        try:
            specs.append(TaskSpec.model_validate(item))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, f"{path}: tasks[{i}]")) from err
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: task names must be unique, repeated: {dupes}")
    backbone = doc.get("backbone")
    if backbone is not None and not isinstance(backbone, str):
        raise ConfigError(f"{path}: `backbone:` must be a name or path string, got {backbone!r}")
    return backbone, specs
