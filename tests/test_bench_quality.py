"""The peer benchmarks' measuring tools: each contender's own peak memory, and one scoring for every SAE."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.child import run_child
from benchmarks.peer_quality import heldout_quality

ROOT = Path(__file__).resolve().parents[1]


def contender(megabytes: int) -> list[str]:
    """A process that fills ``megabytes`` of memory (written, so resident) and reports its own peak."""
    code = (
        "import json; from benchmarks.child import own_peak_rss_mb; "
        f"b = b'x' * ({megabytes} * 2**20); print('RESULT ' + json.dumps({{'peak_rss_mb': own_peak_rss_mb()}}))"
    )
    return [sys.executable, "-c", code]


def test_each_contender_reports_its_own_peak_rss() -> None:
    """A light contender started by a heavy parent, after a heavy contender, reports its own small peak
    (ru_maxrss would report at least the parent's 400 MiB)."""
    parent_ballast = b"x" * (400 * 2**20)
    heavy = run_child(contender(300), ROOT)
    light = run_child(contender(1), ROOT)
    assert len(parent_ballast) and heavy["peak_rss_mb"] > 300
    assert light["peak_rss_mb"] < 150  # a bare interpreter is ~10-30 MiB
    assert light["process_wall_s"] > 0


def test_a_failing_or_silent_contender_stops_the_benchmark() -> None:
    with pytest.raises(SystemExit, match="rc 3"):
        run_child([sys.executable, "-c", "import sys; print('RESULT {}'); sys.exit(3)"], ROOT)
    with pytest.raises(SystemExit, match="no peak_rss_mb"):
        run_child([sys.executable, "-c", "print('RESULT {}')"], ROOT)


def test_heldout_quality_by_hand() -> None:
    """20 rows: ten (2, 0) and ten (0, 0), mean (1, 0), so sum ||x - mean||^2 = 20 (uncentered: 40).

    Only row 0 is off by 1 (squared error 1): FVU 1 / 20. Six latents, k 2: latent 0 fires on 3 rows
    (dense: more than 10 % = 2 rows), latent 1 on exactly 2 (not dense), latent 3 on 1, latent 2 only
    holds zero-activation padding (dead), latents 4 and 5 never appear (dead).
    """
    x = np.zeros((20, 2), dtype=np.float32)
    x[:10, 0] = 2
    x_hat = x.copy()
    x_hat[0, 0] = 1
    indices = np.full((20, 2), 2)
    acts = np.zeros((20, 2), dtype=np.float32)
    indices[:3] = [[0, 1], [0, 1], [0, 3]]
    acts[:3] = [[1.0, 1.0], [1.0, 0.5], [2.0, 0.1]]
    scores = heldout_quality(x, x_hat, acts, indices, n_latents=6)
    assert scores["fvu"] == pytest.approx(1 / 20)
    assert scores["dead_share"] == pytest.approx(3 / 6)
    assert scores["dense_latents"] == 1
    assert scores["l0"] == pytest.approx(6 / 20)


def test_training_samples_of_the_heldout_size_count_a_one_block_latent_as_dead_by_chance() -> None:
    """Latent 0 fires in every block, latent 1 in none, latent 2 in one block of four. Samples of all four
    blocks see latent 2 every time (share 1/3); samples of one block miss it three times in four."""
    from benchmarks.dead_floor import sampled_dead_shares

    counts = torch.tensor([[5, 0, 0], [2, 0, 0], [1, 0, 0], [3, 0, 7]])  # (blocks, N)
    assert sampled_dead_shares(counts, 4, samples=5, seed=0) == [1 / 3] * 5
    one = sampled_dead_shares(counts, 1, samples=400, seed=0)
    assert abs(np.mean(one) - (1 + 3 / 4) / 3) < 0.03
    assert sorted(set(one)) == [1 / 3, 2 / 3]


def test_dead_floor_agrees_with_evaluate_on_heldout_and_training_rows(tmp_path: Path) -> None:
    """The benchmark's own per-block counting gives evaluate's dead_share (held-out) and
    train_dead_share (training) for the same run."""
    from benchmarks.dead_floor import measure
    from pipeline.evaluate import stage as evaluate
    from pipeline.evaluate.config import EvaluateConfig
    from pipeline.fit import stage as fit
    from pipeline.fit.config import FitConfig
    from tests.support.caches import synthetic_cache

    cache = synthetic_cache(tmp_path, [60, 50], layers=(12,), d=16, heldout_rows=24)
    (run,) = fit.run(
        FitConfig(cache=cache.url, layer=12, latents=64, k=2, max_tokens=64, batch_size=32, out=str(tmp_path))
    ).runs
    metrics = ["nmse", "train_dead"]
    (result,) = evaluate.run(
        EvaluateConfig(runs=[run.url], metrics=metrics, max_tokens=0, out=str(tmp_path / "ev"))
    ).metrics
    floor = measure(run.url, samples=3, seed=0)
    assert 0 < result["dead_share"] < 1 and 0 < result["train_dead_share"] < 1  # both counts have something to match
    assert floor.heldout == pytest.approx(result["dead_share"])
    assert floor.train == pytest.approx(result["train_dead_share"])
