"""`sla prune --merge`: the kept LoRA-type units folded into MiniLM's weights, written as a whole model that
transformers reads as a plain backbone and `SLAModel.from_pretrained` reads with its heads, giving the
unmerged set's logits; the bottleneck adapters that cannot fold stay as adapters."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from sla_core import SLAConfig, SLAModel, attach
from sla_core.backbones import load_backbone, load_tokenizer
from sla_core.inject import SLASite

TEXTS = ["a gripping, beautiful film", "flat, dull and far too long", "it was fine"]


def _trained_set(folder: Path, paths: tuple[str, ...]) -> Path:
    """An unpruned set whose units look trained (non-zero up-projections) and a third of whose gates are
    closed, saved as `sla train` saves it."""
    cfg = SLAConfig(tasks={"rt": 2}, rank=2, paths=paths, head_dropout=0.0)
    model = attach(load_backbone("minilm"), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "up_weight" in name:
                p.normal_(0, 0.05)
        model.sla_gates.log_alpha[:, ::3] = -10.0
    model.save_adapters(str(folder))
    return folder


def _logits(model: SLAModel) -> torch.Tensor:
    enc = load_tokenizer("minilm")(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(enc["input_ids"], attention_mask=enc["attention_mask"], task="rt").logits


def test_prune_merge_writes_a_whole_model_with_the_sets_logits(tmp_path: Path) -> None:
    trained = _trained_set(tmp_path / "trained", ("parallel", "lora"))
    out = CliRunner().invoke(
        app, ["prune", "--checkpoint", str(trained), "--out", str(tmp_path / "m"), "--merge"]
    )
    assert out.exit_code == 0, out.output
    merged_dir = tmp_path / "m"

    # the backbone's own weights, under its own names: no adapter tensor and no wrapper in them
    weights = load_file(str(merged_dir / "model.safetensors"))
    assert weights and not any("sla_" in k or "base_layer" in k for k in weights)
    bare = load_backbone("minilm")
    reference = bare.state_dict()
    assert weights.keys() == reference.keys()
    changed = [k for k in weights if not torch.equal(weights[k], reference[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # the LoRA deltas are in the weights
    # the set beside it keeps the heads and the bottleneck adapters only, and says it is merged
    meta = json.loads((merged_dir / "sla_adapter_config.json").read_text())
    assert meta["merged"] is True
    kept = load_file(str(merged_dir / "sla_adapter_model.safetensors"))
    assert any("sla_heads" in k for k in kept) and any("sla_par" in k for k in kept)
    assert not any("sla_lora" in k for k in kept)

    from sla_core.engine.stages import _load

    _, staged = _load(merged_dir, None)  # what `sla evaluate --adapters` loads: the folder's own backbone
    pruned = SLAModel.from_pretrained(str(trained)).prune()  # the same set, pruned but not merged
    assert torch.allclose(_logits(staged), _logits(pruned), atol=1e-4)
    model = SLAModel.from_pretrained(str(merged_dir))
    assert model.pruned and all(site.sla_lora is None for site in model.site_modules)
    assert torch.allclose(_logits(model), _logits(pruned), atol=1e-4)


def test_a_lora_only_merge_runs_on_the_bare_architecture(tmp_path: Path) -> None:
    trained = _trained_set(tmp_path / "trained", ("lora",))
    out = CliRunner().invoke(
        app, ["prune", "--checkpoint", str(trained), "--out", str(tmp_path / "m"), "--merge"]
    )
    assert out.exit_code == 0, out.output
    model = SLAModel.from_pretrained(str(tmp_path / "m"))
    assert model.site_modules == [] and not any(isinstance(m, SLASite) for m in model.backbone.modules())
    pruned = SLAModel.from_pretrained(str(trained)).prune()
    assert torch.allclose(_logits(model), _logits(pruned), atol=1e-4)
    pruned_record = json.loads((tmp_path / "pruned.json").read_text())
    # the record counts the kept structure, though its LoRA units now live in the weights
    assert pruned_record["counts_after"]["kept"] == pruned.parameter_counts()["trainable"]
    assert pruned_record["counts_after"]["kept"] > pruned.parameter_counts()["heads"]
