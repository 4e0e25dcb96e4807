"""What a search hands back: the trials table (CSV + JSON), the best trial under the budget, `SearchResult`.

Each trial ends in one outcome: `completed` (ran all steps and reported its pruned metrics), `early_stopped`
(ASHA ended it), `failed` (it raised or diverged) or `unfinished` (the search was interrupted first).
Only completed trials whose pruned trainable fraction is within the budget can be the best.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuning.trainable import PROJECTED_PERCENT, PRUNED_PERCENT, TrialJob, trial_config

TRIALS_CSV = "trials.csv"
TRIALS_JSON = "trials.json"
RESULT_FILE = "search.json"
BEST_DIR = "best"
OUTCOMES = ("completed", "early_stopped", "failed", "unfinished")


@dataclass(frozen=True)
class BestTrial:
    """The winning trial: its overrides, metric, and where its pruned adapter set is."""

    trial_id: str
    overrides: dict[str, Any]
    metric: str
    value: float
    trainable_fraction: float
    run_dir: str
    adapters: str  # a copy under <experiment>/best/adapters
    metrics_path: str
    config_path: str  # the full experiment config of the trial: `sla train --config` re-runs it


@dataclass(frozen=True)
class SearchResult:
    """A finished (or interrupted) search. Plain JSON: `to_json` / `from_json`."""

    name: str
    experiment_dir: str
    complete: bool
    best: BestTrial | None
    reason: str  # why there is no best, else ""
    trials_csv: str
    trials_json: str
    counts: dict[str, int] = field(default_factory=dict)
    trial_steps: int = 0  # compute used: optimizer steps summed over trials

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> SearchResult:
        d = json.loads(data) if isinstance(data, str) else dict(data)
        best = d.pop("best", None)
        return cls(best=BestTrial(**best) if best else None, **d)


def _outcome(status: str, last: dict[str, Any]) -> str:
    if status == "ERROR":
        return "failed"
    if last.get("final"):
        return "completed"
    return "early_stopped" if status == "TERMINATED" else "unfinished"


def _error_line(trial: Any) -> str:
    """The last line of a failed trial's traceback, e.g. `...NonFiniteLossError: non-finite loss ...`."""
    try:
        text = trial.get_error() or ""
    except Exception:  # an unreadable error file must not hide the table
        text = ""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def trial_row(trial: Any, job: TrialJob) -> dict[str, Any]:
    """One row of the trials table from a Ray Tune `Trial`."""
    last = dict(trial.last_result or {})
    outcome = _outcome(str(trial.status), last)
    final = outcome == "completed"
    value = last.get(job.metric)
    return {
        "trial_id": trial.trial_id,
        "outcome": outcome,
        "status": str(trial.status),
        **{k: v for k, v in sorted(trial.config.items())},
        "steps_done": int(last.get("step", 0) or 0),
        job.metric: float(value) if isinstance(value, int | float) else None,
        "trainable_percent": last.get(PRUNED_PERCENT if final else PROJECTED_PERCENT),
        "feasible": bool(last.get("feasible")) if final else None,
        "error": _error_line(trial) if outcome == "failed" else "",
        "run_dir": str(Path(job.runs_dir) / trial.trial_id),
    }


def pick_best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The completed, feasible row with the best metric (the earliest trial on ties), or None."""
    eligible = [
        r
        for r in rows
        if r["outcome"] == "completed"
        and r["feasible"]
        and isinstance(r[metric], float)
        and math.isfinite(r[metric])
    ]
    if not eligible:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(eligible, key=lambda r: sign * r[metric])  # max keeps the first of equals


def no_best_reason(rows: list[dict[str, Any]], budget: float) -> str:
    counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    over = sum(r["outcome"] == "completed" and not r["feasible"] for r in rows)
    return (
        f"no completed trial within the budget of {budget:.2%} of the backbone: {counts['completed']} "
        f"completed ({over} over budget), {counts['early_stopped']} stopped early, {counts['failed']} "
        f"failed, {counts['unfinished']} unfinished"
    )


def write_table(rows: list[dict[str, Any]], exp_dir: Path) -> tuple[Path, Path]:
    """`trials.csv` and `trials.json` in `exp_dir` (columns: the union of the rows' keys, in order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    csv_path, json_path = exp_dir / TRIALS_CSV, exp_dir / TRIALS_JSON
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2, default=str) + "\n", encoding="utf-8")
    return csv_path, json_path


def export_best(row: dict[str, Any], job: TrialJob, exp_dir: Path, params: dict[str, Any]) -> BestTrial:
    """Copy the winner's pruned adapters and metrics to `<exp_dir>/best/` and write its full config."""
    best_dir = exp_dir / BEST_DIR
    if best_dir.exists():
        shutil.rmtree(best_dir)
    best_dir.mkdir(parents=True)
    run_dir = Path(row["run_dir"])
    shutil.copytree(run_dir / "adapters", best_dir / "adapters")
    shutil.copy2(run_dir / "metrics.json", best_dir / "metrics.json")
    cfg = trial_config(job, params, run_dir).model_dump(mode="json", exclude_unset=True)
    cfg.pop("output_dir", None)
    config_path = best_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return BestTrial(
        trial_id=row["trial_id"],
        overrides=params,
        metric=job.metric,
        value=row[job.metric],
        trainable_fraction=row["trainable_percent"] / 100.0,
        run_dir=str(run_dir),
        adapters=str(best_dir / "adapters"),
        metrics_path=str(best_dir / "metrics.json"),
        config_path=str(config_path),
    )
