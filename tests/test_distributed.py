"""torchrun on CPU (gloo, 2 processes): split extraction, DDP fit, a sweep spread over ranks, and caches
behind fsspec URLs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cache.reader import ActivationCache
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from tests.support.caches import synthetic_cache, tiny_extract_args, tree_bytes
from tests.support.ddp_check import sweep_config

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAE_PIPE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*TORCHRUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_extraction_equals_one(tiny_llama: Path, tmp_path: Path) -> None:
    single = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *tiny_extract_args(tiny_llama, tmp_path / "one")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "SAE_PIPE_QUIET": "1"},
    )
    assert single.returncode == 0, single.stderr
    one = Path(single.stdout.strip().splitlines()[-1])
    two = Path(
        torchrun("-m", "pipeline.cli", *tiny_extract_args(tiny_llama, tmp_path / "two")).stdout.strip().splitlines()[-1]
    )
    assert one.name == two.name
    a, b = ActivationCache.open(str(one)), ActivationCache.open(str(two))
    assert len(a.shards) > 2 and a.manifest["rows"] == b.manifest["rows"]
    for split in ("train", "heldout"):  # the same rows, with the same ids
        rows = [
            {
                (int(d), int(p))
                for s in c.shards
                for d, p in zip(c.read(s["index"], f"{split}/doc"), c.read(s["index"], f"{split}/pos"))
            }
            for c in (a, b)
        ]
        assert rows[0] == rows[1]
    assert tree_bytes(one) == tree_bytes(two)  # CPU forwards are deterministic: even the bytes agree


def test_ddp_fit_keeps_ranks_identical(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path, [1600, 1600, 1600, 1600], d=16)
    torchrun("-m", "tests.support.ddp_check", cache.url, str(tmp_path / "out"), "ddp")
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["steps"] == [25]  # 6400 tokens / (128 x 2 ranks)
    runs = sorted((tmp_path / "out" / "saes").glob("*/cfg.json"))
    assert len(runs) == 1 and all(json.loads(r.read_text())["status"] == "complete" for r in runs)


def test_sweep_spread_over_ranks_equals_one_process(tmp_path: Path) -> None:
    """Each rank trains whole members on the full stream: every member's weights equal a one-process sweep's."""
    cache = synthetic_cache(tmp_path, [1600, 1600, 1600, 1600], d=16)
    torchrun("-m", "tests.support.ddp_check", cache.url, str(tmp_path / "out"), "spread")
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    names = [set(r["weights"]) for r in ranks]
    assert len(names[0]) == len(names[1]) == 2 and not names[0] & names[1]  # two whole members each
    assert ranks[0]["steps"] == ranks[1]["steps"] == [50, 50]  # each rank reads all 6400 tokens
    alone = fit.run(sweep_config(cache.url, str(tmp_path / "one"), spread=True)).runs
    assert {f.name for f in alone} == names[0] | names[1]
    for folder in alone:
        spread = load_file(str(tmp_path / "out" / "saes" / folder.name / "sae.safetensors"))
        for name, tensor in load_file(f"{folder.url}/sae.safetensors").items():
            torch.testing.assert_close(spread[name], tensor, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("url", ["memory://sae-pipe-test/cache", "file://{tmp}/cache"])
def test_cache_behind_an_fsspec_url_round_trips(tiny_llama: Path, tmp_path: Path, url: str) -> None:
    base = {
        "model": str(tiny_llama),
        "layers": "1,3",
        "ctx_len": 32,
        "max_tokens": 600,
        "device": "cpu",
        "shard_mb": 0.02,
    }
    remote = ActivationCache.open(extract.run(ExtractConfig(**base, cache_root=url.format(tmp=tmp_path))).folder)
    local = ActivationCache.open(extract.run(ExtractConfig(**base, cache_root=str(tmp_path / "local"))).folder)
    assert remote.manifest["shards"] == local.manifest["shards"]  # same rows, same checksums
    for record in local.shards:
        np.testing.assert_array_equal(
            remote.read(record["index"], "train/act"), local.read(record["index"], "train/act")
        )
    assert not remote.verify()
