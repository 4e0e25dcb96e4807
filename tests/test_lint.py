"""ruff is part of the test suite: lint and format must be clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> str:
    local = Path(sys.executable).parent / "ruff"
    return str(local) if local.exists() else (shutil.which("ruff") or "ruff")


def test_ruff_check_is_clean():
    result = subprocess.run([_ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = subprocess.run([_ruff(), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_help_lists_commands():
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "info" in result.stdout
