"""reader, sweep and disk: the shuffled stream vs raw reads, one read for four SAEs, bytes per token."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fit import FitConfig, fit
from pipeline.store import ActivationCache
from pipeline.stream import ActivationStream, StreamSpec


def bench_reader(cache: ActivationCache, layer: int, repeats: int) -> dict[str, Any]:
    """Rows/s of the shuffled, prefetched stream (steady state) vs a sequential read of the same files."""
    files = [path for r in cache.shards for path in _act_files(cache, r["index"])]  # one-layer cache: same bytes
    buffer = bytearray(max(p.stat().st_size for p in files))
    reader = ActivationStream(cache, StreamSpec([layer], 4096))
    sum(batch.shape[1] for batch in reader.batches(1))  # warm-up pass: opens arrays, faults the pool in
    raw, stream = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as f:
                f.readinto(buffer)
        raw.append(cache.rows("train") / (time.perf_counter() - start))
        start = time.perf_counter()
        served = sum(batch.shape[1] for batch in reader.batches(1))  # batches are (L, B, D)
        stream.append(served / (time.perf_counter() - start))
    print(
        f"  reader: raw {statistics.median(raw):,.0f} rows/s, stream {statistics.median(stream):,.0f}", file=sys.stderr
    )
    return {
        "raw sequential read": _stats(raw),
        "shuffled stream": _stats(stream),
        "bytes_per_row": cache.d_model * np.dtype(cache.manifest["spec"]["dtype"]).itemsize,
    }


def _act_files(cache: ActivationCache, shard: int) -> list[Path]:
    """The files holding a shard's training activations: one .npy (memmap) or the zarr shard object."""
    root = cache.folder.local() / "shards" / f"{shard:06d}" / "train" / "act"
    npy = root.with_suffix(".npy")
    return [npy] if npy.exists() else [p for p in (root / "c").rglob("*") if p.is_file()]


def bench_sweep(cache: ActivationCache, tokens: int, **settings: Any) -> dict[str, Any]:
    """Wall time of 4 SAEs trained from one read vs 4 separate fits (each reading the cache itself)."""
    base = {
        "cache": cache.folder.url,
        "batch_size": 4096,
        "max_tokens": tokens,
        "device": "cpu",
        "verify": False,
        "log_every": 1000,
        **settings,
    }
    with tempfile.TemporaryDirectory() as out:
        fit(FitConfig(**{**base, "max_tokens": 8192}, out=str(Path(out) / "warm")))  # imports, first allocations
        start = time.perf_counter()
        for seed in range(4):
            fit(FitConfig(**base, seed=seed, out=str(Path(out) / "solo")))
        solo = time.perf_counter() - start
        start = time.perf_counter()
        fit(FitConfig(**base, sweep={"seed": [0, 1, 2, 3]}, out=str(Path(out) / "sweep")))
        sweep = time.perf_counter() - start
    print(f"  sweep {settings}: 4 separate {solo:.1f} s, one read {sweep:.1f} s", file=sys.stderr)
    return {
        "4 separate fits s": solo,
        "4-member sweep s": sweep,
        "ratio": sweep / solo,
        "tokens_each": tokens,
        "layers_read": len(cache.layers),
        "settings": settings,
    }


def bench_disk(caches: list[ActivationCache]) -> list[dict[str, Any]]:
    """Bytes on disk per stored token per layer against 2 d (float16), from the files themselves."""
    rows = []
    for cache in caches:
        files = sum(p.stat().st_size for p in cache.folder.local().rglob("*") if p.is_file())
        tokens, layers = cache.rows("train") + cache.rows("heldout"), len(cache.layers)
        per = files / (tokens * layers)
        rows.append(
            {
                "cache": cache.key,
                "layers": layers,
                "tokens": tokens,
                "bytes_per_token_per_layer": per,
                "2d": 2 * cache.d_model,
                "overhead": per / (2 * cache.d_model) - 1,
            }
        )
    return rows


def _stats(values: list[float]) -> dict[str, float]:
    return {"rows_per_s": statistics.median(values), "min": min(values), "max": max(values)}
