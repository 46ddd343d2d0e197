"""`dvc repro` end to end in a copy of the repo (real SmolLM2, a few thousand tokens), then a change of
fit.k re-runs fit, evaluate and interpret but not extract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "extract": {"max_tokens": 3000, "ctx_len": 128, "shard_mb": 1},
    "fit": {"latents": 512, "k": 16, "batch_size": 256, "epochs": 1},
    "evaluate": {"max_tokens": 200},
    "interpret": {"features": 5, "report_features": 10},
}


BIN = Path(sys.executable).parent  # the venv: `dvc` and the `python` the stages run with
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "SAE_PIPE_QUIET": "1"}
ENV.pop("OPENAI_API_KEY", None)


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=ENV, capture_output=True, text=True, timeout=900)


def repro(repo: Path) -> str:
    result = dvc(repo, "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_repro_then_reuse_extract(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert dvc(repo, "init", "--no-scm", "-q").returncode == 0
    first = repro(repo)
    for stage in ("extract", "fit", "evaluate", "interpret"):
        assert f"Running stage '{stage}'" in first
    manifest = next((repo / "cache" / "activations").glob("*/manifest.json"))
    stamp = manifest.stat().st_mtime_ns
    metrics = json.loads((repo / "cache" / "evaluate.json").read_text())
    (result,) = metrics["runs"].values()
    assert 0 < result["ce_recovered"] <= 1.0 and result["kl_per_token"] < result["kl_zero_per_token"]
    assert list((repo / "cache" / "interpret").glob("*/report.html"))

    params["fit"]["k"] = 32  # what `dvc exp run -S fit.k=32` would set
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    second = repro(repo)
    assert "Running stage 'extract'" not in second and "didn't change, skipping" in second
    for stage in ("fit", "evaluate", "interpret"):
        assert f"Running stage '{stage}'" in second
    assert manifest.stat().st_mtime_ns == stamp
    (run,) = json.loads((repo / "cache" / "fit.json").read_text())["runs"]
    assert "-k32-" in run["name"]
    assert json.loads(dvc(repo, "status", "--json").stdout or "{}") == {}
