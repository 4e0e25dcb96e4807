"""`SLAModel`: a frozen backbone with gated adapter pools, per-task gates and per-task heads.

`attach(backbone, config)` builds it. The forward returns task loss + λ * penalty, so any training
loop (the DeepSpeed engine, a plain HF Trainer, a notebook loop) trains it unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import InitVar, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from sla_core.adapters import AdapterPool, adapter_state, is_adapter_key
from sla_core.config import SLAConfig
from sla_core.gates import build_gates
from sla_core.inject import GateContext, SiteSpec, SLASite, find_sites, unwrap_sites, wrap_sites
from sla_core.prune import kept_members
from sla_core.sparsity import (
    LOG_ALPHA_LIMIT,
    budget_mask,
    expected_open_fraction,
    expected_open_gates,
    solve_shift,
    warmup_lambda,
)

PAD_LOGIT = -1e4  # logits of labels a task does not have, in mixed-task batches


@dataclass
class SLAOutput(ModelOutput):
    """What the forward returns: a transformers `ModelOutput` whose entries are `loss` and `logits`.

    `loss` includes the sparsity term. The training diagnostics (`task_loss` without that term, `penalty`,
    `open_fraction`, `lambda_sparse`) are plain attributes, not entries, so HF Trainer's `evaluate()` and
    `predict()` collect the logits alone as predictions.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    task_loss: InitVar[torch.Tensor | None] = None
    penalty: InitVar[torch.Tensor | None] = None
    open_fraction: InitVar[torch.Tensor | None] = None
    lambda_sparse: InitVar[float] = 0.0

    def __post_init__(self, task_loss, penalty, open_fraction, lambda_sparse) -> None:
        super().__post_init__()
        self.task_loss = task_loss
        self.penalty = penalty
        self.open_fraction = open_fraction
        self.lambda_sparse = lambda_sparse


class EmptyStructureError(ValueError):
    """The decided structure keeps no adapter for a task: its model would be the classification head alone."""

    def __init__(self, tasks: list[str], config: SLAConfig) -> None:
        how = (
            f"budget={config.budget}"
            if config.budget is not None
            else f"lambda_sparse={config.lambda_sparse}"
        )
        fix = (
            "raise sla.budget"
            if config.budget is not None
            else "lower sla.lambda_sparse (e.g. to a tenth), or set sla.budget for a predictable size"
        )
        super().__init__(
            f"every adapter of task(s) {tasks} was closed ({how}): the export would ship the head alone. "
            f"To fix it, {fix}; or pass allow_empty (sla prune --allow-empty, sla.allow_empty: true) to "
            "ship it anyway"
        )
        self.tasks = tasks

    def __reduce__(self):
        return _rebuild_empty_error, (str(self), self.tasks)


def _rebuild_empty_error(message: str, tasks: list[str]) -> EmptyStructureError:
    err = EmptyStructureError.__new__(EmptyStructureError)
    ValueError.__init__(err, message)
    err.tasks = tasks
    return err


def is_decoder(base: nn.Module) -> bool:
    """Whether `base` is a decoder-only LM (last-token pooling), from its config and transformers' tables."""
    from sla_core.backbones import is_decoder_config

    return is_decoder_config(getattr(base, "config", None), type(base).__name__)


class SLAModel(nn.Module):
    """Backbone (frozen) + adapter pools at every site + task gates + task heads.

    Trainable parameters all live under names containing `sla_`, so freezing and saving find them.
    """

    # The loss is a mean computed here: tell HF Trainer not to pass `num_items_in_batch` (it would reach the
    # backbone through **backbone_kwargs) nor to rescale the loss by the process count.
    accepts_loss_kwargs = False

    def __init__(
        self,
        backbone: nn.Module,
        config: SLAConfig,
        sites: list[SiteSpec],
        pruned: bool = False,
        schedule_steps: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.pruned = pruned
        base = backbone.base_model if hasattr(backbone, "base_model") else backbone
        for p in base.parameters():
            p.requires_grad_(False)
        self.backbone = base
        self.backbone_name = str(getattr(getattr(base, "config", None), "name_or_path", "") or "")
        self.decoder = is_decoder(base)
        self.pooling = config.pooling if config.pooling != "auto" else ("last" if self.decoder else "mean")
        self.sites = sites
        self.context = GateContext()
        self.num_candidates = max((c for s in sites for c in s.candidates.values()), default=-1) + 1

        def make_pool(in_dim: int, out_dim: int, k: int, path: str) -> AdapterPool:
            if path == "lora":  # a low-rank linear delta: no activation, no biases
                return AdapterPool(
                    in_dim, out_dim, config.unit_rank, k, "identity", config.dropout, bias=False
                )
            return AdapterPool(in_dim, out_dim, config.unit_rank, k, config.activation, config.dropout)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.site_modules = wrap_sites(base, sites, self.context, make_pool)
            hidden = int(base.config.hidden_size)
            self.sla_heads = nn.ModuleDict({t: nn.Linear(hidden, n) for t, n in config.tasks.items()})
        self.head_dropout = nn.Dropout(config.head_dropout)
        self.sla_gates = None
        self.merged = False  # LoRA-type units folded into the backbone's weights (`merge`)
        self.budget_target: float | None = None
        # Training forwards of the whole run (steps x gradient accumulation), which the schedule's
        # fractions refer to; the engine sets it. Without it the model stays in the search phase.
        self.schedule_steps = schedule_steps
        if not pruned:
            T, C, K = len(config.tasks), self.num_candidates, config.unit_pool
            self.sla_gates = build_gates(config.gate, T, C, K, config.gate_init, config.gate_temperature)
            self.register_buffer("member_params", self._member_params(), persistent=False)
            if config.budget is not None:
                self.budget_target = self._budget_target(config.budget)
            # The structure once decided (fixed-structure phase), saved with the adapters and checkpoints.
            self.register_buffer("sla_decided", torch.zeros(T, C, K))
            self.register_buffer("sla_decided_flag", torch.zeros((), dtype=torch.long))
        self.register_buffer("forward_count", torch.zeros((), dtype=torch.long), persistent=False)

    # ----------------------------------------------------------------- structure
    def _member_params(self) -> torch.Tensor:
        counts = torch.zeros(self.num_candidates, self.config.unit_pool)
        for site in self.site_modules:
            for path, pool in site.pools():
                counts[site.spec.candidates[path]] = pool.num_parameters() / pool.pool_size
        return counts

    def _budget_target(self, budget: float) -> float:
        """Convert a fraction of the backbone (what ships: adapters and heads) into a fraction of candidate
        parameters. The gates are not counted: pruning folds them into the weights."""
        counts = self.parameter_counts()
        heads = counts["heads"]
        target = (budget * counts["backbone"] - heads) / max(counts["adapters"], 1)
        if target <= 0:
            raise ValueError(
                f"budget={budget} of the backbone ({budget * counts['backbone']:.0f} parameters) is smaller "
                f"than the task heads alone ({heads}); raise the budget"
            )
        return min(target, 1.0)

    # ----------------------------------------------------------------- schedule
    def phase_bounds(self) -> tuple[int, int]:
        """(end of the dense phase, end of the search phase) in training forwards."""
        cfg = self.config
        if cfg.decision == "random":
            return 0, 0
        if cfg.dense_fraction == 0 and cfg.search_fraction >= 1.0:
            return 0, 2**62
        if self.schedule_steps is None:
            raise RuntimeError(
                "sla.dense_fraction/search_fraction need the run's length: set `model.schedule_steps` to the "
                "number of training forwards (the engine does), or keep search_fraction at 1"
            )
        dense = round(cfg.dense_fraction * self.schedule_steps)
        return dense, round((cfg.dense_fraction + cfg.search_fraction) * self.schedule_steps)

    def phase(self) -> str:
        """`dense`, `search` or `fixed`, for the next training forward."""
        dense_end, search_end = self.phase_bounds()
        f = int(self.forward_count)
        return "dense" if f < dense_end else "search" if f < search_end else "fixed"

    def _budget_target_at(self, forward: int) -> float:
        """The kept fraction's target during the search: from 1 down to the budget over the warm-up, or over
        the whole search where that is shorter (the last search step then runs at the budget, and the
        decision does not jump to it)."""
        assert self.budget_target is not None
        dense_end, search_end = self.phase_bounds()
        ramp = min(self.config.lambda_warmup_steps, max(search_end - dense_end - 1, 0))
        into = forward - dense_end
        return (
            self.budget_target + (1.0 - self.budget_target) * max(0.0, 1.0 - into / ramp)
            if ramp
            else (self.budget_target)
        )

    def _ranking(self, scores: torch.Tensor) -> torch.Tensor:
        """The budget knapsack's order: the gates' scores, or their scores per parameter where the gate kind
        ranks by value density (`per_param`)."""
        if getattr(self.sla_gates, "per_param", False):
            return scores / self.member_params.clamp(min=1).to(scores.device)
        return scores

    @torch.no_grad()
    def _decision(self) -> torch.Tensor:
        """The structure as the gates (or, for the random control, a seeded draw) decide it now."""
        log_alpha = self.sla_gates.log_alpha.detach()
        if self.config.decision == "random":
            g = torch.Generator().manual_seed(self.config.seed)
            scores = torch.rand(tuple(log_alpha.shape), generator=g)
            return budget_mask(scores, self.member_params, self.budget_target).to(log_alpha.device)
        if self.config.decision == "magnitude":
            # Value per parameter of each member after the dense phase, the same for every task.
            scores = self._member_norms() / self.member_params.clamp(min=1)
            scores = scores.to(log_alpha.device).expand_as(log_alpha)
            return budget_mask(scores, self.member_params, self.budget_target).to(log_alpha.device)
        if self.budget_target is not None:
            clamped = log_alpha.clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)
            return budget_mask(self._ranking(clamped), self.member_params, self.budget_target).to(
                log_alpha.device
            )
        return self.sla_gates.decide(log_alpha)

    @torch.no_grad()
    def _member_norms(self) -> torch.Tensor:
        """(C, K) `AdapterPool.member_norms` of every candidate (ZeRO-3 weights gathered first)."""
        from sla_core.engine.ds import gathered, is_partitioned

        norms = torch.zeros(self.num_candidates, self.config.unit_pool)
        for site in self.site_modules:
            for path, pool in site.pools():
                params = [p for p in pool.parameters() if is_partitioned(p)]
                if params:
                    with gathered(params):
                        values = pool.member_norms()
                else:
                    values = pool.member_norms()
                norms[site.spec.candidates[path]] = values.cpu()
        return norms

    @torch.no_grad()
    def decide_now(self) -> None:
        """Fix the structure: from here on the forward uses the decided gates and the gates stop learning
        (and, with `rewind`, the adapters start again from a fresh initialization)."""
        self.sla_decided.copy_(self._decision())
        self.sla_decided_flag.fill_(1)
        if self.config.rewind:
            self._rewind_adapters()

    @property
    def compacted(self) -> bool:
        """Whether `compact` dropped the closed members' weights (the fixed-structure phase)."""
        return any(pool.kept is not None for site in self.site_modules for _, pool in site.pools())

    @torch.no_grad()
    def compact(self) -> dict[nn.Parameter, tuple[nn.Parameter, Any]]:
        """The fixed-structure phase's memory and compute: decide the structure if not yet done, then keep in
        every pool only the members some task keeps (a closed candidate keeps none). The forward is
        unchanged; saved states keep their full tensors (dropped members at their decided values). Not under
        ZeRO-3: the partitioned weights would have to be gathered and partitioned again.

        Returns:
            {old parameter: (new parameter, index function)} for carrying optimizer state over (the engine
            does).
        """
        from sla_core.engine.ds import is_partitioned

        if self.sla_gates is None:
            raise RuntimeError("a pruned model has no closed members left to drop")
        if any(is_partitioned(p) for p in self.parameters()):
            raise RuntimeError("compact() does not run on ZeRO-3 partitioned weights")
        if not bool(self.sla_decided_flag):
            self.decide_now()
        decided = self.sla_decided
        moved: dict[nn.Parameter, tuple[nn.Parameter, Any]] = {}
        for site in self.site_modules:
            for path, pool in site.pools():
                g = decided[:, site.spec.candidates[path], : pool.pool_size]  # (T, K)
                kept = kept_members(g)
                moved.update(pool.compact(kept, g[:, kept]))
        return moved

    @torch.no_grad()
    def restore_decision(self, decided: torch.Tensor) -> None:
        """Set the decided structure (T, C, K) saved by a run (resume): no new decision, no rewind."""
        if tuple(decided.shape) != tuple(self.sla_decided.shape):
            raise ValueError(
                f"the saved structure has shape {tuple(decided.shape)}, "
                f"this model's {tuple(self.sla_decided.shape)}"
            )
        self.sla_decided.copy_(decided)
        self.sla_decided_flag.fill_(1)

    @torch.no_grad()
    def _rewind_adapters(self) -> None:
        """Every pool back to a seeded fresh initialization (the same on every rank; ZeRO-3 partitions are
        gathered, written on rank 0 and scattered again)."""
        import deepspeed

        from sla_core.engine.ds import is_partitioned

        generator = torch.Generator().manual_seed(self.config.seed + 1)
        for site in self.site_modules:
            for _, pool in site.pools():
                params = [p for p in pool.parameters() if is_partitioned(p)]
                if params:
                    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                        pool.reset_parameters(generator)
                else:
                    pool.reset_parameters(generator)

    def _gate_values(
        self, task_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """(values (T, C, K) for this forward, probabilities or None, phase). `task_ids` (B,): the batch's
        tasks, which a straight-through gate may weigh its update by."""
        gates = self.sla_gates
        if not self.training:
            return self.decided_gates(), None, "eval"
        phase = self.phase()
        if phase == "fixed":
            if not bool(self.sla_decided_flag):
                self.decide_now()
            return self.sla_decided, None, phase
        if phase == "dense":
            probs = gates.probabilities(gates.log_alpha)
            return torch.ones_like(probs), probs, phase
        if self.budget_target is not None:
            target = self._budget_target_at(int(self.forward_count))
            clamped = gates.log_alpha.detach().clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)
            if getattr(gates, "straight_through", False):  # the knapsack's structure itself, every step
                mask = budget_mask(self._ranking(clamped), self.member_params, target).to(clamped.device)
                counts = None if task_ids is None else torch.bincount(task_ids, minlength=mask.shape[0])
                values = gates.straight_through_values(mask, counts)
                return values, values, phase
            shift = solve_shift(clamped, gates.probabilities, self.member_params, target)
            values, probs = gates(shift)
        else:
            values, probs = gates()
        return values, probs, phase

    def candidate_names(self) -> list[str]:
        names = [""] * self.num_candidates
        for spec in self.sites:
            for path, idx in spec.candidates.items():
                names[idx] = spec.candidate_name(path)
        return names

    def task_index(self, task: str) -> int:
        try:
            return self.config.task_names.index(task)
        except ValueError:
            raise ValueError(
                f"unknown task {task!r}; this model has tasks {self.config.task_names}"
            ) from None

    # ------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task: str | None = None,
        task_ids: torch.Tensor | None = None,
        **backbone_kwargs: Any,
    ) -> SLAOutput:
        """Run the backbone with adapters and the task heads.

        Args:
            task: one task for the whole batch, or
            task_ids: (B,) task index per example (mixed-task batches). With one task, both may be omitted.
        """
        B = input_ids.shape[0]
        task_ids = self._task_ids(task, task_ids, B, input_ids.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        probs, phase = None, "pruned"
        self.context.task_ids = task_ids
        if self.sla_gates is not None:
            values, probs, phase = self._gate_values(task_ids)  # (T, C, K) each
            self.context.gates = values[task_ids]  # (B, C, K)
            if phase in ("fixed", "eval"):  # a decided structure: closed candidates need no compute
                # closed for every task, not only this batch's: the ranks of a multi-process run see other
                # tasks' rows, and all must run (and reduce the gradients of) the same pools
                self.context.closed = (values.amax(dim=(0, 2)) <= 0).tolist()
        else:
            self.context.gates = None
        try:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **backbone_kwargs)
        finally:
            self.context.gates = None
            self.context.task_ids = None
            self.context.closed = None
        hidden = out.last_hidden_state  # (B, T, H)
        logits = self._heads(self._pool(hidden, attention_mask), task_ids)  # (B, max_labels)
        return self._loss(logits, labels, task_ids, probs, phase)

    def _task_ids(self, task: str | None, task_ids: torch.Tensor | None, B: int, device) -> torch.Tensor:
        if task_ids is not None:
            task_ids = task_ids.to(device=device, dtype=torch.long)
            if task_ids.shape != (B,):
                raise ValueError(f"task_ids must have shape ({B},), got {tuple(task_ids.shape)}")
            if task_ids.min() < 0 or task_ids.max() >= len(self.config.tasks):
                raise ValueError(f"task_ids out of range for {len(self.config.tasks)} tasks")
            return task_ids
        if task is None:
            if len(self.config.tasks) > 1:
                raise ValueError(f"give task= or task_ids=; this model has tasks {self.config.task_names}")
            task = self.config.task_names[0]
        return torch.full((B,), self.task_index(task), dtype=torch.long, device=device)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * positions).argmax(dim=1)  # last non-pad token, left or right padding
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def _heads(self, pooled: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        pooled = self.head_dropout(pooled)
        width = max(self.config.tasks.values())
        names = self.config.task_names
        present = torch.unique(task_ids).tolist()
        # Training runs every head, on zero rows if need be: data-parallel ranks must call the same modules
        # and produce gradients for the same parameters (ZeRO reduces gradients in buckets and ZeRO-3
        # gathers parameters per module call), whatever tasks each rank's batch holds.
        all_heads = self.training and len(names) > 1
        if len(present) == 1 and not all_heads:
            logits = self.sla_heads[names[present[0]]](pooled)
            n = logits.shape[1]
            return logits if n == width else F.pad(logits, (0, width - n), value=PAD_LOGIT)
        logits = pooled.new_full((pooled.shape[0], width), PAD_LOGIT)
        for t in range(len(names)) if all_heads else present:
            rows = task_ids == t
            head_out = self.sla_heads[names[t]](pooled[rows])
            logits[rows, : head_out.shape[1]] = head_out
        return logits

    def _loss(self, logits, labels, task_ids, probs, phase: str) -> SLAOutput:
        if len(set(self.config.tasks.values())) == 1 or torch.unique(task_ids).numel() == 1:
            n = self.config.tasks[self.config.task_names[int(task_ids[0])]]
            logits = logits[:, :n]
        if labels is None:
            return SLAOutput(loss=None, logits=logits)
        self._check_labels(labels, task_ids)
        task_loss = F.cross_entropy(logits.float(), labels.long())
        if phase in ("pruned", "eval") or not self.training:
            return SLAOutput(loss=task_loss, logits=logits, task_loss=task_loss)
        forward = int(self.forward_count)
        self.forward_count += 1
        # Every phase keeps the gate logits in the graph (with weight 0 when they do not learn), so that
        # data-parallel ranks reduce gradients for the same parameters in every step.
        idle = 0.0 * self.sla_gates.log_alpha.sum()
        if phase == "fixed":
            kept = (self.sla_decided > 0).any(dim=0).to(self.member_params.dtype)  # (C, K)
            opened = (kept * self.member_params).sum() / self.member_params.sum()
            zero = task_loss.new_zeros(())
            return SLAOutput(task_loss + idle, logits, task_loss, zero, opened, 0.0)
        open_fraction = expected_open_fraction(probs, self.member_params)
        if phase == "dense" or self.budget_target is not None:  # the shift holds the budget: no penalty
            shown = torch.ones_like(open_fraction) if phase == "dense" else open_fraction
            zero = task_loss.new_zeros(())
            return SLAOutput(
                task_loss + 0.0 * probs.sum() + idle, logits, task_loss, zero, shown.detach(), 0.0
            )
        since = forward - self.phase_bounds()[0]
        lam = warmup_lambda(self.config.lambda_sparse, since, self.config.lambda_warmup_steps)
        penalty = expected_open_gates(probs, self.member_params)  # = open_fraction with one task
        loss = task_loss + lam * penalty
        return SLAOutput(loss, logits, task_loss, penalty.detach(), open_fraction.detach(), lam)

    def _check_labels(self, labels: torch.Tensor, task_ids: torch.Tensor) -> None:
        sizes = torch.tensor(list(self.config.tasks.values()), device=labels.device)[task_ids]
        bad = (labels < 0) | (labels >= sizes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            task = self.config.task_names[int(task_ids[i])]
            raise ValueError(
                f"label {int(labels[i])} at batch row {i} is outside task {task!r}'s "
                f"{self.config.tasks[task]} labels (0..{self.config.tasks[task] - 1})"
            )

    # ---------------------------------------------------------------- reporting
    def parameter_groups(
        self, lr: float, gate_lr: float | None = None, weight_decay: float = 0.0
    ) -> list[dict]:
        """Optimizer groups: adapters and heads (weight decay), gates (none, their own lr)."""
        adapters, gates = [], []
        for name, p in self.named_parameters():
            if not is_adapter_key(name):
                continue
            (gates if "sla_gates" in name else adapters).append(p)
        groups = [{"params": adapters, "lr": lr, "weight_decay": weight_decay}]
        if gates:
            groups.append({"params": gates, "lr": gate_lr or lr * 10, "weight_decay": 0.0})
        return groups

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts by kind; `trainable` = adapters + gates + heads."""
        counts = {"backbone": 0, "adapters": 0, "gates": 0, "heads": 0}
        for name, p in self.named_parameters():
            n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # full size under ZeRO-3
            if "sla_heads" in name:
                counts["heads"] += n
            elif "sla_gates" in name:
                counts["gates"] += n
            elif is_adapter_key(name):
                counts["adapters"] += n
            else:
                counts["backbone"] += n
        # members that `compact` dropped still count: they were trained (`trainable` is the candidate pool)
        counts["adapters"] += sum(p.dropped_numel for s in self.site_modules for _, p in s.pools())
        counts["trainable"] = counts["adapters"] + counts["gates"] + counts["heads"]
        return counts

    def trainable_percent(self) -> float:
        counts = self.parameter_counts()
        return 100.0 * counts["trainable"] / counts["backbone"]

    @torch.no_grad()
    def decided_gates(self) -> torch.Tensor:
        """Final gate values (T, C, K): the fixed structure once decided, else what the gates decide now
        (the budget's knapsack in budget mode); zeros are removed by `prune`."""
        if self.sla_gates is None:
            raise RuntimeError("this model is already pruned; its gates are decided")
        if bool(self.sla_decided_flag):
            return self.sla_decided.clone()
        return self._decision()

    def empty_tasks(self) -> list[str]:
        """Tasks for which the decision keeps no adapter at all (they would ship their head alone)."""
        decided = self.decided_gates()  # (T, C, K)
        return [t for i, t in enumerate(self.config.task_names) if not bool((decided[i] > 0).any())]

    @torch.no_grad()
    def gate_probabilities(self) -> dict[str, dict[str, float]]:
        """{task: {candidate: P(open)}} — for pool_size > 1 the probability any member is open."""
        names = self.candidate_names()
        if self.sla_gates is None:
            probs = self._pruned_open_table()
        else:
            probs = self.sla_gates.probabilities(self.sla_gates.log_alpha.detach())  # no sample drawn
            probs = 1.0 - torch.prod(1.0 - probs, dim=-1)  # (T, C)
        return {
            t: {names[c]: float(probs[i, c]) for c in range(len(names))}
            for i, t in enumerate(self.config.task_names)
        }

    def _pruned_open_table(self) -> torch.Tensor:
        table = torch.zeros(len(self.config.tasks), self.num_candidates)
        for site in self.site_modules:
            for path, pool in site.pools():
                if pool.mix is not None:
                    table[:, site.spec.candidates[path]] = (pool.mix > 0).any(dim=1).float()
        return table

    # ------------------------------------------------------------ prune / save
    def prune(self, inplace: bool = False, allow_empty: bool | None = None) -> SLAModel:
        """Decide gates, drop closed adapters, fold open gate values into the weights. Exact in eval mode.

        Raises:
            EmptyStructureError: the decision keeps no adapter for a task (its export would be the head
                alone), unless `allow_empty` (default: `config.allow_empty`).
        """
        from sla_core.prune import prune_state

        if self.pruned:
            return self
        allow = self.config.allow_empty if allow_empty is None else allow_empty
        empty = self.empty_tasks()
        if empty and not allow:
            raise EmptyStructureError(empty, self.config)
        state = {k: v.detach().cpu() for k, v in adapter_state(self).items()}
        new_sites, new_state = prune_state(state, self.sites, self.decided_gates().cpu(), self.config)
        backbone = self.backbone if inplace else copy.deepcopy(self.backbone)
        unwrap_sites(backbone)
        pruned = SLAModel(backbone, self.config, new_sites, pruned=True)
        pruned.load_sla_state(new_state)
        pruned.backbone_name = self.backbone_name
        pruned.to(next(self.parameters()).device)
        return pruned.train(self.training)

    def load_sla_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load adapter, gate, head and mix tensors; every expected key must be present with its shape."""
        for site in self.site_modules:
            for _, pool in site.pools():
                if self.pruned:
                    pool.set_mix(torch.ones(len(self.config.tasks), pool.pool_size))
        own = adapter_state(self)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"adapter tensors do not match the structure: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict(state, strict=False)
        for site in self.site_modules:
            for _, pool in site.pools():
                if pool.mix is not None:
                    pool.set_mix(pool.mix)

    @torch.no_grad()
    def merge(self) -> SLAModel:
        """Fold every kept LoRA-type unit into its projection's weight, in place, and drop it: the merged
        model runs at the bare backbone's cost (sites left without adapters are unwrapped). Only a pruned
        model whose LoRA-type pools serve every task alike (one task, or a pool open for all) can merge;
        bottleneck adapters (with their activation) stay as they are. Exact up to float rounding.

        Raises:
            ValueError: the model is not pruned, or a pool weights tasks differently (it cannot merge).
        """
        if not self.pruned:
            raise ValueError("merge a pruned model: call prune() first")
        for site in self.site_modules:
            pool = site.sla_lora
            if pool is None:
                continue
            if not pool.unit_mix:
                raise ValueError(
                    f"{site.spec.module}: its LoRA-type units weight tasks differently, so they cannot be "
                    "folded into one shared weight; merge a single-task model"
                )
            delta = pool.up_weight @ pool.down_weight  # (out, in)
            weight = site.base_layer.weight
            weight += (delta if isinstance(site.base_layer, nn.Linear) else delta.t()).to(weight.dtype)
            site.sla_lora = None
            site.spec.pools["lora"] = 0
        for site in self.site_modules:
            if not site.pools():
                parent_name, _, child = site.spec.module.rpartition(".")
                parent = self.backbone.get_submodule(parent_name) if parent_name else self.backbone
                setattr(parent, child, site.base_layer)
        self.site_modules = [s for s in self.site_modules if s.pools()]
        self.merged = True
        return self

    def save_adapters(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Write `sla_adapter_config.json` + `sla_adapter_model.safetensors` (adapters, gates, heads only)."""
        from sla_core.io import save_adapters

        save_adapters(self, path, extra=extra)  # a merged model: `sla_core.io.save_merged`

    def save_pretrained(self, save_directory: str, is_main_process: bool = True, **_: Any) -> None:
        """PEFT's name for saving: write the adapter set into `save_directory`, keeping its other files.

        The backbone is not written. transformers' other keywords (`state_dict`, `safe_serialization`, ...)
        are accepted and ignored: the set is always the model's own `sla_` tensors, as safetensors.
        """
        from sla_core.io import save_adapter_files

        if is_main_process:
            save_adapter_files(self, save_directory)

    @classmethod
    def from_pretrained(
        cls, path: str, backbone: nn.Module | None = None, dtype: torch.dtype = torch.float32
    ) -> SLAModel:
        """PEFT's name for loading: the backbone named in the set's description, with the set attached.

        Args:
            path: a folder holding `sla_adapter_config.json` and `sla_adapter_model.safetensors`.
            backbone: a backbone already in memory, used instead of loading the named one.
        Raises:
            AdapterFileError: the set names no backbone (pass `backbone=`), or cannot be loaded.
        """
        from sla_core.io import AdapterFileError, backbone_source, load_adapters, read_adapter_config

        if backbone is None:
            name = backbone_source(path, read_adapter_config(path))
            if not name:
                raise AdapterFileError(
                    f"{path}: the set does not name its backbone; "
                    "pass backbone=load_backbone(<name or folder>)"
                )
            from sla_core.backbones import load_backbone

            backbone = load_backbone(name, dtype=dtype)
        return load_adapters(backbone, path)

    def print_trainable_parameters(self) -> None:
        """PEFT's summary line. `all params` is backbone + trainable; `trainable%` is of the backbone's
        parameters, as in `trainable_percent()` (PEFT divides by all params)."""
        counts = self.parameter_counts()
        trainable, frozen = counts["trainable"], counts["backbone"]
        print(
            f"trainable params: {trainable:,} || all params: {trainable + frozen:,} || "
            f"trainable%: {self.trainable_percent():.4f} (of the backbone's {frozen:,} parameters)"
        )


def attach(
    backbone: nn.Module,
    config: SLAConfig,
    sites: list[SiteSpec] | None = None,
    schedule_steps: int | None = None,
) -> SLAModel:
    """Freeze `backbone` and add gated adapter pools at its sites (the defaults, or `target_modules`).

    Args:
        backbone: a transformers base model (e.g. BertModel) or a decoder LM (e.g. LlamaForCausalLM).
        sites: a saved structure to rebuild (pruned models); normally None.
        schedule_steps: training forwards of the run, which `dense_fraction`/`search_fraction` refer to.
    Returns:
        The `SLAModel`; the backbone is modified in place (its projections are wrapped).
    """
    base = backbone.base_model if hasattr(backbone, "base_model") else backbone
    if any(isinstance(m, SLASite) for m in base.modules()):
        raise ValueError("this backbone already carries adapters; load a fresh backbone")
    if sites is not None:
        return SLAModel(backbone, config, sites, pruned=True)
    sites = find_sites(base, config.target_modules, config.paths)
    index = 0
    for spec in sites:
        for path in config.paths:
            if spec.allowed and path not in spec.allowed:
                continue
            spec.pools[path] = config.unit_pool
            spec.candidates[path] = index
            index += 1
    return SLAModel(backbone, config, sites, schedule_steps=schedule_steps)
