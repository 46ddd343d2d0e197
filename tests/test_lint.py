"""The code stays formatted, lint-clean and type-checked (the same tools a contributor runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    targets = ["pipeline", "stages", "tests", "benchmarks", "--exclude", "benchmarks/peers"]
    lint = run(str(BIN / "ruff"), "check", *targets)
    assert lint.returncode == 0, lint.stdout
    fmt = run(str(BIN / "ruff"), "format", "--check", *targets)
    assert fmt.returncode == 0, fmt.stdout


@pytest.mark.slow
def test_mypy() -> None:
    result = run(str(BIN / "mypy"), "--no-error-summary")
    assert result.returncode == 0, result.stdout
