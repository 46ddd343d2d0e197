"""The automatic sparsity coefficient (pipeline.sae.archs.sparsity.SparsityControl): its anti-windup on a
synthetic plant that lags and saturates as Adam-trained weights do, and its state across a resumed fit."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.fit import stage as fit
from pipeline.sae.archs.sparsity import SparsityControl
from pipeline.sae.interface import Step
from tests.support.caches import synthetic_cache
from tests.test_fit import run_cfg

AUTO = SimpleNamespace(sparsity_coeff=0.0, sparsity_warmup=0.0)  # the Knobs coeff() reads: automatic
STEP = Step(0, 0.0, torch.zeros(1, dtype=torch.bool), False, lambda t: t)


def plant_l0(control: SparsityControl, natural: float, target: int, steps: int = 300) -> list[float]:
    """Batch mean L0 of a fake training run under ``control``. The weights sit at log L0 = w; the
    reconstruction pulls w towards log(natural), the penalty's coefficient c pushes it down (up when c < 0).
    Each step moves w by at most RATE (Adam's lr: a stronger pull moves it no faster, tanh saturates) after
    a momentum average (the lag); the reading carries 1 % batch noise."""
    rate, momentum, noise = 0.01, 0.0, random.Random(0)
    w, seen = math.log(natural), []
    for _ in range(steps):
        pull = (math.log(natural) - w) - control.coeff(AUTO, STEP)  # type: ignore[arg-type]
        momentum = 0.9 * momentum + 0.1 * math.tanh(pull / 0.1)
        w += rate * momentum
        seen.append(math.exp(w) * (1 + 0.01 * noise.gauss(0, 1)))
        control.update(seen[-1], target)
    return seen


@pytest.mark.parametrize(
    ("signed", "natural", "settle_by"),
    [(True, 18.0, 220), (False, 120.0, 200)],  # jumprelu below its target (c turns negative), standard above
)
def test_anti_windup_settles_where_plain_pi_overshoots(signed: bool, natural: float, settle_by: int) -> None:
    k = 32
    for anti_windup in (False, True):
        l0 = np.array(plant_l0(SparsityControl(1.0, signed, anti_windup), natural, k))
        off = np.flatnonzero(np.abs(np.log(l0 / k)) > 0.05)  # steps more than 5 % off the target
        last_off = int(off[-1]) if len(off) else -1
        overshoot = (l0.max() / k - 1) if natural < k else (1 - l0.min() / k)  # past the target, from either side
        if anti_windup:
            assert last_off < settle_by and overshoot < 0.05, (last_off, overshoot)
        else:  # wound up on the way: past the target by a third, still swinging at the end
            assert last_off > 280 and overshoot > 0.3, (last_off, overshoot)


def test_resumed_jumprelu_repeats_the_coefficient_trajectory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = synthetic_cache(tmp_path, [2048, 2048]).url
    settings = {"arch": "jumprelu", "max_tokens": 4096, "log_every": 1}
    (whole,) = fit.run(run_cfg(cache, tmp_path / "a", **settings)).runs
    real_step, calls = fit.train_step, [0]

    def dying_step(*args: object, **kwargs: object) -> dict:
        calls[0] += 1
        if calls[0] == 14:  # the last state was saved after step 10 (checkpoint_every 10)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fit, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        fit.run(run_cfg(cache, tmp_path / "b", **settings))
    monkeypatch.setattr(fit, "train_step", real_step)
    (resumed,) = fit.run(run_cfg(cache, tmp_path / "b", resume=True, **settings)).runs
    logs = [np.genfromtxt(f"{run.url}/log.csv", delimiter=",", names=True) for run in (whole, resumed)]
    assert len(logs[0]) == 16 and logs[0]["sparsity_coeff"].std() > 0.1  # the coefficient moved
    np.testing.assert_array_equal(logs[1]["step"], logs[0]["step"])
    np.testing.assert_allclose(logs[1]["sparsity_coeff"], logs[0]["sparsity_coeff"], rtol=1e-9, atol=0)
    np.testing.assert_allclose(logs[1]["l0"], logs[0]["l0"], rtol=1e-9, atol=0)
