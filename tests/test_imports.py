"""The layering contract: dependencies point inward (flows -> tuning -> sla_core), checked on the source.

Every import statement counts, at the top of a module or inside a function (a lazy import is still a
dependency). `bench/` is a client of sla_core and tuning, never of the orchestration in flows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "sla_core": {"flows", "tuning", "prefect", "mlflow", "ray"},
    "tuning": {"flows"},
    "bench": {"flows"},
}


def imported_roots(path: Path) -> set[str]:
    """The top-level package of every absolute import in `path`."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_nothing_further_out(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    bad = {
        str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package])
        for f in files
        if imported_roots(f) & FORBIDDEN[package]
    }
    assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}; found {bad}"


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from flows.cli import app\n    import ray.tune\n")
    assert imported_roots(source) == {"os", "flows", "ray"}
