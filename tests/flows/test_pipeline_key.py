"""The pipeline run id follows what the run computes: the config, the data, the search and the code, and
nothing else (not where outputs and caches go)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.flows.conftest import ROOT


def _key(cfg: Any, fingerprint: str = "f1", search: bool = True, samples: int = 2, code: str = "c1") -> str:
    from flows.pipeline import pipeline_key
    from flows.stages import PreparedData

    data = PreparedData({"rotten_tomatoes": _Ref(fingerprint)}, {}, 0.0)
    return pipeline_key(cfg, data, search, samples, code)


@dataclass(frozen=True)
class _Ref:
    fingerprint: str


def test_the_pipeline_key_changes_with_config_data_search_and_code_only() -> None:
    from sla_core.experiment import load_experiment, with_overrides

    cfg = load_experiment(ROOT / "configs" / "tiny.yaml")
    base = _key(cfg)
    assert base == _key(cfg)
    changed = {
        "config": _key(with_overrides(cfg, {"train.steps": 21})),
        "sla": _key(with_overrides(cfg, {"sla.rank": 8})),
        "data": _key(cfg, fingerprint="f2"),
        "search": _key(cfg, search=False),
        "samples": _key(cfg, samples=3),
        "code": _key(cfg, code="c2"),
    }
    assert all(v != base for v in changed.values()), changed
    assert len(set(changed.values())) == len(changed)
    moved = with_overrides(cfg, {"output_dir": "/elsewhere", "cache_dir": "/other-cache"})
    assert _key(moved) == base  # where outputs go does not change what is computed
    assert _key(cfg, search=False, samples=2) == _key(cfg, search=False, samples=9)  # samples unused then
