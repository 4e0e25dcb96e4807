"""PNG figures for the MLflow run: gate probabilities per layer, site and task; accuracy against noise."""

from __future__ import annotations

import re
from pathlib import Path

_CANDIDATE = re.compile(r"^layer(-?\d+)\.(.+)$")


def gate_grid(probs: dict[str, float]) -> tuple[list[int], list[str], list[list[float]]]:
    """{`layer3.attn.seq`: p} -> (layers, columns like `attn.seq`, grid[layer][column]); missing = nan."""
    cells: dict[tuple[int, str], float] = {}
    for name, p in probs.items():
        m = _CANDIDATE.match(name)
        layer, column = (int(m.group(1)), m.group(2)) if m else (-1, name)
        cells[(layer, column)] = float(p)
    layers = sorted({k[0] for k in cells})
    columns = sorted({k[1] for k in cells})
    grid = [[cells.get((layer, c), float("nan")) for c in columns] for layer in layers]
    return layers, columns, grid


def plot_gate_heatmap(
    gates: dict[str, dict[str, float]], path: str | Path, title: str = "", label: str = "P(open)"
) -> Path:
    """One panel per task: rows are layers, columns are site.path; colour is P(gate open) (or `label`).

    Args:
        gates: `SLAModel.gate_probabilities()`, {task: {candidate: probability}}, or any value in [0, 1]
            per candidate (the pruned set's `kept_share`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not gates:
        raise ValueError("no gate probabilities to plot")
    tasks = list(gates)
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.2 + 2.4 * len(tasks), 4.2), squeeze=False)
    image = None
    for ax, task in zip(axes[0], tasks, strict=True):
        layers, columns, grid = gate_grid(gates[task])
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(task, fontsize=10)
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(v) for v in layers], fontsize=8)
        ax.set_ylabel("layer")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:  # not nan
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if v < 0.5 else "black",
                    )
    fig.colorbar(image, ax=axes[0].tolist(), label=label, shrink=0.8)
    fig.suptitle(title or "gate probabilities per layer, site and task", fontsize=11)
    return _save(fig, path)


def plot_noise_curve(
    curves: dict[str, dict[float, float]], path: str | Path, metric: str = "accuracy"
) -> Path:
    """Test `metric` against the character+word noise level, one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("no noise curves to plot")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for task, points in curves.items():
        levels = sorted(float(k) for k in points)
        ax.plot(levels, [points[k] for k in sorted(points, key=float)], marker="o", label=task)
    ax.set_xlabel("noise level (char and word operations per unit)")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"test {metric} under input noise")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
