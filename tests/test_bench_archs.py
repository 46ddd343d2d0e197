"""benchmarks/archs.py's bookkeeping on hand-made tables: Pareto frontier, log-L0 interpolation, the bar."""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks.archs_report import at_l0, bar, pareto


def test_pareto_frontier_of_a_hand_made_table() -> None:
    points = [
        (16.0, 0.30),  # 0: front (lowest L0)
        (32.0, 0.20),  # 1: front
        (32.0, 0.25),  # 2: same L0, worse value than 1
        (40.0, 0.20),  # 3: same value as 1 at a higher L0
        (64.0, 0.12),  # 4: front
        (128.0, 0.13),  # 5: beaten by 4 on both
        (128.0, 0.08),  # 6: front
        (20.0, math.nan),  # 7: no KL measured: never on it
        (64.0, 0.12),  # 8: a tie with 4: neither beats the other
    ]
    assert pareto(points) == [0, 1, 4, 8, 6]


def test_at_l0_interpolates_in_log_l0() -> None:
    points = [(16.0, 0.4), (64.0, 0.2)]
    assert at_l0(points, 32.0) == pytest.approx(0.3)  # log 32 is halfway between log 16 and log 64
    assert at_l0(points, 64.0) == pytest.approx(0.2)
    assert at_l0(points, 8.0) is None and at_l0(points, 100.0) is None  # never extrapolated


def _run(name: str, pair: str, target: float | None, l0: float, fvu: float, tps: float, dead: float) -> dict[str, Any]:
    return {"name": name, "pair": pair, "target": target, "l0": l0, "fvu": fvu, "tokens_per_s": tps, "dead_share": dead}


def test_bar_against_interpolated_peer_runs() -> None:
    results = [
        _run("standard", "SAELens Standard", 32, 32.0, 0.29, 3000.0, 0.005),
        _run("SAELens Standard", "", None, 16.0, 0.4, 1000.0, 0.0),
        _run("SAELens Standard", "", None, 64.0, 0.2, 900.0, 0.0),
        _run("gated", "SAELens Gated", 32, 32.0, 0.31, 5000.0, 0.0),  # worse than the peer's 0.3
        _run("SAELens Gated", "", 32, 32.0, 0.30, 1000.0, 0.0),
        _run("standard", "SAELens Standard", 64, 64.0, 0.1, 1.0, 0.5),  # not at the bar's L0: ignored
    ]
    standard, gated = bar(results)
    assert standard["peer_fvu"] == pytest.approx(0.3) and standard["fvu_ok"]
    assert standard["speedup"] == pytest.approx(3000 / 950) and standard["pass"]
    assert not gated["fvu_ok"] and not gated["pass"] and gated["speedup"] == pytest.approx(5.0)
