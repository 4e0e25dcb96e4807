"""`sla compare`: ours against baselines on your own config and data, through the same loop."""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli import app


@app.command("compare")
def compare(
    config: Path = typer.Option(..., "--config", help="Experiment YAML: your backbone, tasks and training."),
    methods: str = typer.Option(
        "sla,lora:r=8,full_ft:lr=1e-4",
        "--methods",
        help="Comma-separated methods with options: sla, adapters, lora[:r=N], prefix[:tokens=N], "
        "full_ft; any method takes lr=X, ours takes any `sla:` key (sla:lambda_sparse=0.5).",
    ),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated training seeds, e.g. 0,1,2."),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE config override for every cell."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: runs/<name>/compare)."),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="Also log every cell as an MLflow run (e.g. sqlite:///mlflow.db)."
    ),
    report_only: bool = typer.Option(
        False, "--report-only", help="Train nothing: write the table from the finished cells in --out."
    ),
) -> None:
    """Train ours and the chosen baselines on the same batches and seeds, then write a side-by-side table
    (accuracy, macro-F1, trainable %, kept %, seconds per step, inference time over the bare backbone)
    and a PNG of accuracy against kept parameters. Finished cells are reused: rerun to resume.

    Example: sla compare --config configs/tiny.yaml --methods sla,lora:r=4,lora:r=8 --seeds 0,1
    """
    from flows.compare import compare as run_compare
    from sla_core.data import DataError
    from sla_core.experiment import load_experiment, parse_overrides

    specs = [m.strip() for m in _split_methods(methods) if m.strip()]
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise _fail(f"--seeds {seeds!r}: give integers separated by commas, e.g. 0,1,2") from None
    if not specs or not seed_list:
        raise _fail("give at least one method (--methods) and one seed (--seeds)")
    try:
        cfg = load_experiment(config, parse_overrides(overrides))
        folder = out or cfg.run_dir / "compare"
        summary = run_compare(
            cfg, specs, seed_list, folder, tracking_uri=tracking_uri, echo=typer.echo, report_only=report_only
        )
    except (DataError, ValueError, FileNotFoundError, RuntimeError) as err:
        raise _fail(str(err)) from err
    typer.echo((folder / "compare.md").read_text(encoding="utf-8"))
    typer.echo(f"table {folder / 'compare.md'}; figure {folder / 'compare.png'}")
    if not summary:
        raise typer.Exit(1)


def _split_methods(text: str) -> list[str]:
    """Split at commas that start a new method (`lora:r=4,alpha=8,sla` -> `lora:r=4,alpha=8`, `sla`)."""
    parts: list[str] = []
    for piece in text.split(","):
        if parts and "=" in piece and ":" not in piece and ":" in parts[-1]:
            parts[-1] += "," + piece
        else:
            parts.append(piece)
    return parts


def _fail(message: str) -> typer.Exit:
    typer.secho(f"sla: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)
