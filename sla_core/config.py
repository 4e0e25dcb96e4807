"""`SLAConfig`: everything that defines the adapter structure and its sparsity objective."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from sla_core.gates import GATE_KINDS

PathKind = Literal["sequential", "parallel", "lora"]
Pooling = Literal["auto", "cls", "mean", "last"]
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@dataclass
class SLAConfig:
    """Configuration of the gated adapter pool.

    Args:
        tasks: task name -> number of labels. Order defines task ids.
        rank: bottleneck width r of every adapter.
        pool_size: K adapters per candidate, shared by all tasks.
        paths: which candidate kinds exist: "sequential" and "parallel" bottleneck adapters at the output
            projections, and "lora", a bias-free low-rank linear delta at every attention projection
            (q, k, v, o) and the feed-forward in and out projections.
        target_modules: None for the architecture's default sites, else a regex (str) matched with
            `re.fullmatch` against module names, or a list of name suffixes (as in PEFT).
        gate: a kind registered in `sla_core.gates.GATE_KINDS`: "hard_concrete" (L0, reaches exact 0/1,
            so pruning is exact), "sigmoid", "fixed" (every gate open and not learned: classic fixed
            bottleneck adapters, the Houlsby baseline), "topk" (budget mode only: every search forward
            opens exactly the budget's knapsack of the logits, which learn through it straight-through, as
            in movement pruning), "sensitivity" (budget mode only: the same knapsack, ranked by a moving
            average of |dloss/dgate|, AdaLoRA's importance; the budget recipe's gate),
            "sensitivity_per_param" (that score over the member's parameters: the knapsack's value density),
            or one added with `register_gate_kind`.
        lambda_sparse: weight of the sparsity penalty (expected open fraction of candidate parameters).
        lambda_warmup_steps: λ grows linearly from 0 over this many training forwards of the search phase
            (in budget mode, the kept fraction's target falls linearly from 1 to the budget over them, or
            over the whole search phase where that is shorter).
        budget: if set, the kept size as a fraction of the backbone's parameters (0.002 means 0.2%; heads
            included). Each step a scalar shift of the gate logits makes the expected kept size equal the
            scheduled target exactly, and the decision keeps the most probable gates that fit (a knapsack);
            `lambda_sparse` is then unused.
        dense_fraction, search_fraction: the schedule, as fractions of the training steps. Dense: every gate
            held open, no penalty. Search: the gates learn under λ or the budget. Then the structure is
            decided once and exactly, and the rest of training (the fixed-structure phase) trains the kept
            adapters with the gates frozen and no penalty. `search_fraction: 1` (the default) never fixes.
        gate_unit: "module" (one gate per adapter) or "rank" (one gate per rank unit: an adapter of rank r
            becomes r gated units of rank 1, so that a budget buys fine pieces).
        decision: "learned" (from the gates), "random" (a random structure that fits the budget, decided
            at the start: the control that shows what learning the structure adds) or "magnitude" (after
            the dense phase, the members that moved their outputs most per parameter, ||up|| * ||down||
            over its size, that fit the budget: no gate learning; set search_fraction 0).
        rewind: at the decision, start the kept adapters again from a fresh (seeded) initialization, so that
            the fixed-structure phase trains the decided structure from scratch, as S3Delta retrains it: the
            search's weights were learned beside units that the decision removes.
        allow_empty: let `prune` ship a task with no adapter left (its head alone) instead of refusing.
    """

    tasks: dict[str, int]
    rank: int = 8
    pool_size: int = 1
    paths: tuple[str, ...] = ("sequential", "parallel")
    target_modules: str | list[str] | None = None
    activation: str = "relu"
    dropout: float = 0.0
    head_dropout: float = 0.1
    pooling: Pooling = "auto"
    gate: str = "hard_concrete"
    gate_init: float = 3.0
    gate_temperature: float = 2.0 / 3.0
    lambda_sparse: float = 1.0
    lambda_warmup_steps: int = 0
    budget: float | None = None
    dense_fraction: float = 0.0
    search_fraction: float = 1.0
    gate_unit: str = "module"
    decision: str = "learned"
    rewind: bool = False
    allow_empty: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self._validate()

    def _validate(self) -> None:
        def bad(key: str, value: Any, why: str) -> ValueError:
            return ValueError(f"SLAConfig.{key}={value!r}: {why}")

        if not isinstance(self.tasks, dict) or not self.tasks:
            raise bad("tasks", self.tasks, "give a non-empty dict of task name -> number of labels")
        for name, n in self.tasks.items():
            if not isinstance(name, str) or not name:
                raise bad("tasks", self.tasks, f"task name {name!r} must be a non-empty string")
            if not isinstance(n, int) or isinstance(n, bool) or n < 2:
                raise bad("tasks", self.tasks, f"task {name!r} needs an integer number of labels >= 2")
        if not isinstance(self.rank, int) or not 1 <= self.rank <= 4096:
            raise bad("rank", self.rank, "must be an integer in [1, 4096]")
        if not isinstance(self.pool_size, int) or not 1 <= self.pool_size <= 64:
            raise bad("pool_size", self.pool_size, "must be an integer in [1, 64]")
        if not self.paths or any(p not in ("sequential", "parallel", "lora") for p in self.paths):
            raise bad("paths", self.paths, "use a non-empty subset of ('sequential', 'parallel', 'lora')")
        if len(set(self.paths)) != len(self.paths):
            raise bad("paths", self.paths, "paths must not repeat")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", self.activation, f"choose one of {ACTIVATIONS}")
        for key in ("dropout", "head_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise bad(key, value, "must be in [0, 1)")
        if self.pooling not in ("auto", "cls", "mean", "last"):
            raise bad("pooling", self.pooling, "choose one of auto, cls, mean, last")
        if self.gate not in GATE_KINDS:
            raise bad("gate", self.gate, f"choose one of {sorted(GATE_KINDS)} (hard_concrete prunes exactly)")
        if not self.gate_temperature > 0:
            raise bad("gate_temperature", self.gate_temperature, "must be > 0")
        if self.lambda_sparse < 0:
            raise bad("lambda_sparse", self.lambda_sparse, "must be >= 0")
        if self.lambda_warmup_steps < 0:
            raise bad("lambda_warmup_steps", self.lambda_warmup_steps, "must be >= 0")
        for key in ("dense_fraction", "search_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, getattr(self, key), "a fraction of the training steps in [0, 1]")
        if self.dense_fraction + self.search_fraction > 1.0 + 1e-9:
            raise bad(
                "search_fraction",
                self.search_fraction,
                f"dense ({self.dense_fraction}) + search must be <= 1",
            )
        if self.gate_unit not in ("module", "rank"):
            raise bad("gate_unit", self.gate_unit, "choose 'module' or 'rank'")
        if self.decision not in ("learned", "random", "magnitude"):
            raise bad("decision", self.decision, "choose 'learned', 'random' or 'magnitude'")
        if self.decision in ("random", "magnitude") and self.budget is None:
            raise bad(
                "decision", self.decision, f"a {self.decision} decision needs a budget (e.g. budget: 0.002)"
            )
        if self.decision == "magnitude" and not (self.dense_fraction > 0 and self.search_fraction < 1):
            raise bad(
                "decision",
                self.decision,
                "the magnitude decision reads the adapters after a dense phase: set dense_fraction > 0 "
                "(e.g. 0.4) and search_fraction < 1 (e.g. 0)",
            )
        if getattr(GATE_KINDS[self.gate], "straight_through", False) and self.budget is None:
            raise bad("gate", self.gate, "the top-k gate needs a budget (e.g. 0.002)")
        if self.budget is not None and not 0.0 < self.budget < 1.0:
            raise bad("budget", self.budget, "a fraction of the backbone's parameters in (0, 1), e.g. 0.014")
        if self.target_modules is not None and not isinstance(self.target_modules, str | list):
            raise bad("target_modules", self.target_modules, "give a regex string or a list of name suffixes")

    @property
    def unit_rank(self) -> int:
        """The rank of one gated unit: `rank`, or 1 with `gate_unit: rank`."""
        return 1 if self.gate_unit == "rank" else self.rank

    @property
    def unit_pool(self) -> int:
        """Gated units per candidate: `pool_size`, or `pool_size * rank` with `gate_unit: rank`."""
        return self.pool_size * self.rank if self.gate_unit == "rank" else self.pool_size

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["paths"] = list(self.paths)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SLAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SLAConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)
