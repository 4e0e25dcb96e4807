"""Shared fixtures: offline environment and the shipped backbones (loaded once per session)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from sla_core.backbones import load_tokenizer

    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from sla_core.backbones import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def smollm2_state():
    """SmolLM2's weights, loaded once (12-15 s); tests build fresh models from them."""
    from sla_core.backbones import load_backbone

    model = load_backbone("smollm2")
    return model.config, {k: v.clone() for k, v in model.state_dict().items()}
