"""The device feed's CUDA-shaped branch (two reused host buffers, one batch ahead), run on the CPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.fit import feed
from pipeline.fit import stage as fit_module
from pipeline.fit.config import FitConfig
from pipeline.fit.feed import Staging, Waited, device_batches, to_device
from tests.support.caches import synthetic_cache

CPU = torch.device("cpu")


def stored(n: int, dtype: str) -> list[np.ndarray]:
    """``n`` distinct (L, B, D) batches as the stream serves them (float16, or float32 from an int8 cache)."""
    rng = np.random.default_rng(1)
    return [(rng.standard_normal((2, 8, 5)) * 100).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_staged_batches_come_in_order_one_ahead_none_lost(dtype: str) -> None:
    batches = stored(5, dtype)
    staged = []

    class Counted(Staging):
        def stage(self, batch: np.ndarray) -> feed.Staged:
            staged.append(batch)
            return super().stage(batch)

    got = []
    for i, x in enumerate(device_batches(iter(batches), CPU, Counted(CPU))):
        assert len(staged) == min(i + 2, len(batches))  # batch i+1's copy starts before batch i is handed over
        got.append(x)
    assert len(got) == len(batches)  # the last one too
    for x, batch in zip(got, batches):  # checked at the end: a batch must survive the buffers' reuse
        plain = to_device(batch, CPU)
        assert x.dtype == plain.dtype == torch.float32 and torch.equal(x, plain)


def test_staging_reuses_two_host_buffers() -> None:
    staging = Staging(CPU)
    seen = set()
    for batch in stored(6, "float16"):
        staging.stage(batch)
        seen |= {buffer.data_ptr() for buffer in staging.buffers}
    assert len(seen) == 2


def test_waited_counts_the_time_blocked_on_the_next_batch_not_the_consumers() -> None:
    def slow(n: int) -> Any:  # noqa: ANN401
        for i in range(n):
            time.sleep(0.05)  # reading a batch
            yield torch.full((2,), float(i))

    feed_ = Waited(slow(3))
    got = []
    for x in feed_:
        time.sleep(0.2)  # training on it: not waiting for data
        got.append(float(x[0]))
    assert got == [0.0, 1.0, 2.0]
    assert 0.15 <= feed_.seconds < 0.5  # three reads (and the end), none of the 0.6 s spent training


def tiny_fit(tmp_path: Path) -> dict[str, Any]:
    """A seven-step fit's settings on a two-shard synthetic cache."""
    cache = synthetic_cache(tmp_path, [700, 600], layers=(0,)).url
    cfg: dict[str, Any] = {
        "cache": cache,
        "layer": 0,
        "latents": 64,
        "k": 4,
        "batch_size": 128,
        "max_tokens": 896,
        "device": "cpu",
    }
    return cfg | {"precision": "float32", "pool_mb": 1, "log_every": 0, "checkpoint_every": 0}


def test_fit_through_the_staged_feed_equals_the_plain_feed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fit loop gets the same batches, in the same order, through the staged feed as through the plain one."""
    cfg = tiny_fit(tmp_path)
    (plain,) = fit_module.run(FitConfig(**cfg, out=str(tmp_path / "plain"))).runs
    monkeypatch.setattr(fit_module, "device_batches", lambda b, d: feed.device_batches(b, d, Staging(d)))
    (staged,) = fit_module.run(FitConfig(**cfg, out=str(tmp_path / "staged"))).runs
    a, b = load_file(f"{plain.url}/sae.safetensors"), load_file(f"{staged.url}/sae.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_records_its_time_waiting_for_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """cfg.json's result and the closing line give the loop's seconds and those spent waiting for batches: a
    feed slowed by 0.1 s a batch shows as 0.7 s of waiting over seven steps, inside the loop's time."""

    def slowed(batches: Any, device: torch.device) -> Any:  # noqa: ANN401
        for x in feed.device_batches(batches, device):
            time.sleep(0.1)
            yield x

    monkeypatch.setattr(fit_module, "device_batches", slowed)
    (run,) = fit_module.run(FitConfig(**tiny_fit(tmp_path), out=str(tmp_path / "runs"))).runs
    result = run.read_json("cfg.json")["result"]
    assert result["steps"] == 7 and 0.7 <= result["data_wait_s"] <= result["train_s"]
    said = " ".join(capsys.readouterr().err.split())
    assert f"in {result['train_s']:.1f} s, {result['data_wait_s']:.1f} s of it waiting for data" in said
