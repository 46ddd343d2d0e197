"""`dvc repro` end to end in a git copy of the repo (real SmolLM2, a few thousand tokens), then
`dvc exp run -S fit.k=... -S fit.sweep=...` re-runs fit, evaluate and interpret but not extract.

SmolLM2 is handed to the stages as a model folder (its GGUF file de-quantized once, here): each stage is its
own process, and parsing the GGUF file costs each one more than its work. test_real_model covers the GGUF path."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "extract": {"max_tokens": 3000, "ctx_len": 128, "shard_mb": 1},
    "fit": {"latents": 512, "k": 16, "batch_size": 256, "epochs": 1},
    "evaluate": {"max_tokens": 200},
    "interpret": {"features": 5, "report_features": 10},
    "steer": {"n_features": 2, "strengths": [0, 1], "max_new_tokens": 4, "heldout_tokens": 128},
    "circuit": {"pairs": 8, "steps": 5, "ig_steps": 2, "sizes": [5]},
}


BIN = Path(sys.executable).parent  # the venv: `dvc` and the `python` the stages run with
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "SAE_PIPE_QUIET": "1"}
ENV.pop("OPENAI_API_KEY", None)


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=ENV, capture_output=True, text=True, timeout=900)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def git(repo: Path, *args: str) -> None:
    ok(
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, capture_output=True, text=True
        )
    )


@pytest.fixture(scope="module")
def smollm2_folder(smollm2: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M's weights (float32, as the stages load the GGUF file on a CPU) and tokenizer, saved as a folder
    (through a plain copy of the model: transformers refuses to save one loaded from GGUF)."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    folder = tmp_path_factory.mktemp("models") / "smollm2"
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_repro_then_reuse_extract(tmp_path: Path, smollm2_folder: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    params["model"]["name"] = str(smollm2_folder)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    git(repo, "init", "-q")
    ok(dvc(repo, "init", "-q"))
    ok(dvc(repo, "config", "core.analytics", "false"))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a copy of the project")
    first = ok(dvc(repo, "repro"))
    for stage in ("extract", "fit", "evaluate", "interpret", "steer", "circuit"):
        assert f"Running stage '{stage}'" in first
    manifest = next((repo / "cache" / "activations").glob("*/manifest.json"))
    stamp = manifest.stat().st_mtime_ns
    metrics = json.loads((repo / "cache" / "evaluate.json").read_text())
    (result,) = metrics["runs"].values()
    assert 0 < result["ce_recovered"] <= 1.0 and result["kl_per_token"] < result["kl_zero_per_token"]
    assert list((repo / "cache" / "interpret").glob("*/report.html"))
    (steered,) = json.loads((repo / "cache" / "steer.json").read_text())["runs"].values()
    assert steered["strength"] == 1 and steered["mean_kl"] > 0  # the steer stage measured its grid

    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first reproduction")
    # the README's two `dvc exp run -S` forms at once: a new k, and a sweep grid trained from one read
    second = ok(dvc(repo, "exp", "run", "-S", "fit.k=32", "-S", "+fit.sweep.k=[16,32]"))
    assert "Running stage 'extract'" not in second and "didn't change, skipping" in second
    for stage in ("fit", "evaluate", "interpret", "steer", "circuit"):
        assert f"Running stage '{stage}'" in second
    assert manifest.stat().st_mtime_ns == stamp
    runs = json.loads((repo / "cache" / "fit.json").read_text())["runs"]
    assert sorted(run["name"].split("-k")[1][:2] for run in runs) == ["16", "32"]
    assert len(json.loads((repo / "cache" / "evaluate.json").read_text())["runs"]) == 2
    assert json.loads(dvc(repo, "status", "--json").stdout or "{}") == {}
