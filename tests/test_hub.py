"""The Hugging Face hub code paths, exercised offline on a local hub cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.extract.corpus import builtin_documents

ROOT = Path(__file__).resolve().parents[1]
MODEL_SHA = "0123456789abcdef0123456789abcdef01234567"
DATA_SHA = "fedcba9876543210fedcba9876543210fedcba98"


def _snapshot(hub: Path, kind: str, repo: str, sha: str) -> Path:
    """The folder layout huggingface_hub keeps for a downloaded repo at a commit."""
    root = hub / f"{kind}s--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    snapshot = root / "snapshots" / sha
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture(scope="module")
def hub(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    hub = tmp_path_factory.mktemp("hf") / "hub"
    model = _snapshot(hub, "model", "tiny-org/tiny-llama", MODEL_SHA)
    for file in tiny_llama.iterdir():
        shutil.copy(file, model / file.name)
    data = _snapshot(hub, "dataset", "tiny-org/docs", DATA_SHA) / "data"
    data.mkdir()
    table = pa.table({"text": list(builtin_documents()[400:460])})
    pq.write_table(table, data / "train-00000-of-00001.parquet")
    return hub


def sae_pipe(hub: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "SAE_PIPE_QUIET": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_hub_model_and_dataset_from_the_local_cache(hub: Path, tmp_path: Path) -> None:
    args = [
        "extract",
        "--model",
        "tiny-org/tiny-llama",
        "--dataset",
        "tiny-org/docs",
        "--split",
        "train",
        "--layers",
        "1",
        "--ctx-len",
        "32",
        "--max-tokens",
        "500",
        "--cache-root",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    result = sae_pipe(hub, *args)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((Path(result.stdout.split()[-1]) / "manifest.json").read_text())
    assert manifest["spec"]["model"]["commit"] == MODEL_SHA and manifest["spec"]["model"]["kind"] == "hub"
    assert manifest["spec"]["corpus"]["commit"] == DATA_SHA and manifest["rows"]["total"] == 500


def test_openwebtext_id_is_a_hub_dataset(hub: Path, tmp_path: Path) -> None:
    result = sae_pipe(
        hub,
        "extract",
        "--model",
        "tiny-org/tiny-llama",
        "--dataset",
        "Skylion007/openwebtext",
        "--layers",
        "1",
        "--cache-root",
        str(tmp_path),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot find dataset 'Skylion007/openwebtext'" in " ".join(result.stderr.split())


def test_unknown_hub_model_is_one_clear_error(hub: Path, tmp_path: Path) -> None:
    result = sae_pipe(hub, "extract", "--model", "nobody/no-such-model", "--cache-root", str(tmp_path))
    assert result.returncode == 2 and "cannot find model 'nobody/no-such-model'" in " ".join(result.stderr.split())
