"""reader, sweep and disk: the shuffled stream vs raw reads, one read for four SAEs, bytes per token."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.reader import ActivationCache
from pipeline.cache.stream import ActivationStream, StreamSpec
from pipeline.fit.config import FitConfig
from pipeline.fit.stage import fit

STEADY_ROWS = 400_000  # rows per reader measurement: the stream's start-up is not what a trainer waits on


def bench_reader(cache: ActivationCache, layer: int, repeats: int, label: str) -> dict[str, Any]:
    """Rows/s of the shuffled, prefetched stream (steady state) vs a sequential read of the same bytes."""
    spans = [_layer_bytes(cache, r["index"], cache.layer_index(layer)) for r in cache.shards]
    buffer = bytearray(max(length for _, _, length in spans))
    reader = ActivationStream(cache, StreamSpec([layer], 4096))
    sum(batch.shape[1] for batch in reader.batches(1))  # warm-up pass: opens arrays, faults the pool in
    passes = -(-STEADY_ROWS // cache.rows("train"))  # a small cache is read several times per measurement
    raw, stream = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes):
            for path, offset, length in spans:
                with open(path, "rb", buffering=0) as f:
                    f.seek(offset)
                    f.readinto(memoryview(buffer)[:length])
        raw.append(passes * cache.rows("train") / (time.perf_counter() - start))
        start = time.perf_counter()
        served = sum(batch.shape[1] for batch in reader.batches(passes))  # batches are (L, B, D)
        stream.append(served / (time.perf_counter() - start))
    print(
        f"  reader {label}: raw {statistics.median(raw):,.0f} rows/s, stream {statistics.median(stream):,.0f}",
        file=sys.stderr,
    )
    return {
        "label": label,
        "raw sequential read": _stats(raw),
        "shuffled stream": _stats(stream),
        "bytes_per_row": cache.d_model * np.dtype(cache.manifest["spec"]["dtype"]).itemsize,
    }


def _layer_bytes(cache: ActivationCache, shard: int, position: int) -> tuple[Path, int, int]:
    """(file, offset, length) of one layer's training activations in a shard; for zarr the whole shard
    object (this harness reads zarr on one-layer caches, where that is exactly the layer)."""
    root = cache.folder.local() / "shards" / f"{shard:06d}" / "train" / "act"
    npy = root.with_suffix(".npy")
    if npy.exists():
        mapped = np.load(npy, mmap_mode="r", allow_pickle=False)  # (L, n, D)
        layer_bytes = mapped[0].nbytes
        return npy, int(mapped.offset) + position * layer_bytes, layer_bytes
    (path,) = [p for p in (root / "c").rglob("*") if p.is_file()]
    return path, 0, path.stat().st_size


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
