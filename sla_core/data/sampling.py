"""Batches over prepared datasets: multi-task training batches with task ids, and ordered evaluation batches.

An epoch of `MultiTaskBatches` has ceil(total rows / global batch) steps. Its plan (which task and row
fills each slot) is a pure function of (seed, epoch), so resuming from `state_dict()` replays exactly.
Each task contributes round(p_t * slots) rows per epoch, p_t proportional to its size (`proportional`)
or to size ** (1 / temperature) (`temperature`); a task that needs more rows than it has cycles through
fresh permutations. Rank r of `world_size` takes slice r of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from sla_core.data.ref import DatasetRef, read_arrow


class TokenRows:
    """One split's token ids as flat values + offsets, and its labels (cheap row gathers)."""

    def __init__(self, ref: DatasetRef, split: str) -> None:
        table = read_arrow(ref.split_path(split))
        ids = table.column("input_ids").combine_chunks()
        self.offsets = ids.offsets.to_numpy().astype(np.int64)
        self.values = ids.values.to_numpy()
        self.labels = table.column("labels").to_numpy().astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def collate(
    rows: Sequence[np.ndarray], labels: Sequence[int], task_ids: Sequence[int], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of this batch."""
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        input_ids[b, : len(r)] = torch.from_numpy(r.astype(np.int64))
        attention_mask[b, : len(r)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)),  # (B,)
        "task_ids": torch.as_tensor(np.asarray(task_ids, dtype=np.int64)),  # (B,)
    }


def _largest_remainder(probs: np.ndarray, total: int) -> np.ndarray:
    raw = probs * total
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


class MultiTaskBatches:
    """Deterministic, resumable, shardable batches mixing several tasks.

    Args:
        refs: prepared datasets by task name (one tokenizer: one pad id).
        split: which split to draw from. batch_size: rows per batch on each rank.
        task_order: task names; `task_ids` index into it (default: the order of `refs`).
        sampling: "proportional" (p_t ~ n_t) or "temperature" (p_t ~ n_t ** (1 / temperature)).
        seed: plans are a function of (seed, epoch). mix: tasks mixed inside a batch, else one task per batch.
        rank, world_size: each rank gets a disjoint slice of each global batch of batch_size * world_size.
    """

    def __init__(
        self,
        refs: Mapping[str, DatasetRef],
        split: str = "train",
        batch_size: int = 16,
        task_order: Sequence[str] | None = None,
        sampling: Literal["proportional", "temperature"] = "proportional",
        temperature: float = 2.0,
        seed: int = 0,
        mix: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.task_order = list(task_order) if task_order is not None else list(refs)
        unknown = set(self.task_order) ^ set(refs)
        if unknown:
            raise ValueError(f"task_order {self.task_order} must name exactly the tasks {sorted(refs)}")
        if sampling not in ("proportional", "temperature") or temperature <= 0:
            raise ValueError(
                f"sampling must be proportional or temperature (> 0), got {sampling}, {temperature}"
            )
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
            )
        pads = {refs[t].pad_token_id for t in self.task_order}
        if len(pads) != 1:
            raise ValueError(
                f"tasks were prepared with different pad ids {pads}; use one backbone's tokenizer"
            )
        self.pad_token_id = pads.pop()
        self.rows = [TokenRows(refs[t], split) for t in self.task_order]
        sizes = np.array([len(r) for r in self.rows], dtype=np.float64)
        if (sizes == 0).any():
            raise ValueError(f"split {split!r} is empty for a task of {self.task_order}")
        weights = sizes if sampling == "proportional" else sizes ** (1.0 / temperature)
        self.probs = weights / weights.sum()
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.global_batch = batch_size * world_size
        self.steps = int(np.ceil(sizes.sum() / self.global_batch))
        self.seed, self.mix = seed, mix
        self.epoch, self.step = 0, 0
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.steps

    def _stream(self, task: int, count: int, epoch: int) -> np.ndarray:
        """`count` row indices of `task`: fresh seeded permutations, concatenated."""
        n = len(self.rows[task])
        passes = [
            np.random.default_rng([self.seed, epoch, task, p]).permutation(n) for p in range(-(-count // n))
        ]
        return np.concatenate(passes)[:count] if passes else np.zeros(0, dtype=np.int64)

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(task index, row index) for every slot of the epoch, shape (steps * global_batch,)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1], self._plan[2]
        rng = np.random.default_rng([self.seed, epoch, 2**31 - 1])
        k = len(self.rows)
        if self.mix:
            tasks = np.repeat(np.arange(k), _largest_remainder(self.probs, self.steps * self.global_batch))
            rng.shuffle(tasks)
        else:
            batch_tasks = np.repeat(np.arange(k), _largest_remainder(self.probs, self.steps))
            rng.shuffle(batch_tasks)
            tasks = np.repeat(batch_tasks, self.global_batch)
        rows = np.empty(len(tasks), dtype=np.int64)
        for t in range(k):
            slots = np.flatnonzero(tasks == t)
            rows[slots] = self._stream(t, len(slots), epoch)
        self._plan = (epoch, tasks, rows)
        return tasks, rows

    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """This rank's batch at (epoch, step)."""
        tasks, rows = self.plan(epoch)
        start = step * self.global_batch + self.rank * self.batch_size
        sel = range(start, start + self.batch_size)
        token_rows = [self.rows[tasks[i]].row(rows[i]) for i in sel]
        labels = [self.rows[tasks[i]].labels[rows[i]] for i in sel]
        return collate(token_rows, labels, [tasks[i] for i in sel], self.pad_token_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current position to the end of this epoch; the state moves past each batch
        before it is yielded, so a checkpoint taken after consuming it resumes at the next one."""
        epoch = self.epoch
        while self.epoch == epoch:
            step = self.step
            self.epoch, self.step = (epoch + 1, 0) if step + 1 >= self.steps else (epoch, step + 1)
            yield self.batch(epoch, step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "steps": self.steps,
            "task_order": list(self.task_order),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (
            state.get("seed", self.seed) != self.seed
            or state.get("task_order", self.task_order) != self.task_order
        ):
            raise ValueError("state was saved with another seed or task order; resume with the same ones")
        if state.get("steps", self.steps) != self.steps:
            raise ValueError(
                f"state was saved with {state['steps']} steps per epoch, now {self.steps}; "
                "resume with the same data and batch size"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def skip(self, n_batches: int) -> None:
        """Move forward `n_batches` (across epochs) without building them."""
        pos = self.epoch * self.steps + self.step + n_batches
        self.epoch, self.step = divmod(pos, self.steps)


def eval_batches(
    ref: DatasetRef, split: str, batch_size: int, task_id: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `split` in stored order (the last one may be short), with a constant `task_ids`."""
    rows = TokenRows(ref, split)
    for start in range(0, len(rows), batch_size):
        idx = range(start, min(start + batch_size, len(rows)))
        yield collate(
            [rows.row(i) for i in idx], rows.labels[list(idx)], [task_id] * len(idx), ref.pad_token_id
        )
