"""The model card: a pure function of the pruned set and metrics; prune writes it, evaluate adds metrics."""

from __future__ import annotations

from sla_core import load_adapters
from sla_core.engine.card import CARD_FILE, model_card, write_card
from sla_core.engine.result import PrunedAdapterSet
from sla_core.io import read_adapter_config

PRUNED = PrunedAdapterSet(
    path="run/adapters",
    sha256="0" * 64,
    method="sla",
    backbone="sentence-transformers/all-MiniLM-L6-v2",
    step=40,
    counts_before={"backbone": 22_000_000, "trainable": 110_000, "kept": 90_000},
    counts_after={"backbone": 22_000_000, "trainable": 22_000, "kept": 20_000},
    open_candidates={"sst2": ["l0.attn.lora", "l1.ffn.bottleneck"], "news": []},
    gate_probability={
        "sst2": {"l0.attn.lora": 0.7, "l1.ffn.bottleneck": 0.95, "l1.attn.lora": 0.1},
        "news": {"l0.attn.lora": 0.2, "l1.ffn.bottleneck": 0.3, "l1.attn.lora": 0.1},
    },
)


def test_card_names_backbone_method_tasks_counts_structure_and_gate_map():
    card = model_card(PRUNED)
    assert card.startswith("---\nlibrary_name: sla\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n---")
    assert "# sla adapters for `sentence-transformers/all-MiniLM-L6-v2`" in card
    assert "trained for 40 steps" in card and "tasks: sst2, news" in card
    assert "| trainable | 110,000 | 22,000 |" in card and "| kept | 90,000 | 20,000 |" in card
    assert "| trainable % of the backbone | 0.5000 | 0.1000 |" in card
    assert "| sst2 | 2 | 3 |" in card and "| news | 0 | 3 |" in card
    assert "- sst2: `l1.ffn.bottleneck` 0.950, `l0.attn.lora` 0.700" in card  # by P(open), open ones only
    assert "- news: none (the head alone)" in card
    assert "## Metrics" not in card
    shares = {"sst2": {"l0.attn.lora": 0.25, "l1.ffn.bottleneck": 0.5, "l1.attn.lora": 0.0}}
    by_share = model_card(PrunedAdapterSet(**{**PRUNED.__dict__, "kept_share": shares}))
    assert "by share of its units kept" in by_share  # rank units: P(any open) would be 1 for every kept one
    assert "- sst2: `l1.ffn.bottleneck` 0.500, `l0.attn.lora` 0.250" in by_share


def test_card_with_metrics_has_a_row_per_task_and_only_the_columns_measured():
    metrics = {"sst2/test_accuracy": 0.875, "sst2/test_accuracy_before": 0.875, "news/test_accuracy": 0.5}
    card = model_card(PRUNED, metrics)
    assert "| task | test accuracy | test accuracy before pruning |" in card
    assert "| sst2 | 0.8750 | 0.8750 |" in card and "| news | 0.5000 |  |" in card
    local = model_card(PrunedAdapterSet(**{**PRUNED.__dict__, "backbone": "/models/x"}))
    assert "base_model" not in local  # a path is not a hub id


def test_a_card_in_the_set_folder_does_not_disturb_loading(tmp_path):
    from sla_core import SLAConfig, attach
    from tests.sla_core.tiny import tiny_backbone

    folder = tmp_path / "adapters"
    attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4)).prune().save_adapters(folder)
    path = write_card(PrunedAdapterSet(**{**PRUNED.__dict__, "path": str(folder)}))
    assert path == folder / CARD_FILE and path.read_text() == model_card(PRUNED)
    read_adapter_config(folder)
    load_adapters(tiny_backbone("bert"), folder)


def test_the_cards_code_is_in_the_projects_format(tmp_path):
    """Cards are committed with results, and `make test` formats the code in Markdown: a card must pass."""
    import subprocess
    import sys
    from pathlib import Path

    card = tmp_path / "README.md"
    card.write_text(model_card(PRUNED), encoding="utf-8")
    ruff = Path(sys.executable).with_name("ruff")
    project = Path(__file__).resolve().parents[3] / "pyproject.toml"
    args = [str(ruff), "format", "--check", "--config", str(project), str(card)]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
