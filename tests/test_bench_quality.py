"""The peer benchmarks' measuring tools: each contender's own peak memory, and one scoring for every SAE."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

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
