"""reader, sweep and disk: the shuffled stream vs raw reads, one read for four SAEs, bytes per token;
the stream from a local cache vs the same cache through fsspec (run alone, issue 19 part 6); and a fresh
stream's first epoch without and with fit's checksum check:

    python -m benchmarks.bench_io --fsspec CACHE [--repeats 3] [--write]
    python -m benchmarks.bench_io --checksums CACHE [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import publish
from pipeline.cache.reader import ActivationCache
from pipeline.cache.stream import ActivationStream, StreamSpec
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig

STEADY_ROWS = 400_000  # rows per reader measurement: the stream's start-up is not what a trainer waits on


def bench_reader(cache: ActivationCache, layer: int, repeats: int, label: str) -> dict[str, Any]:
    """Rows/s of the shuffled, prefetched stream (steady state) vs a sequential read of the same bytes."""
    spans = [_layer_bytes(cache, r["index"], cache.layer_index(layer)) for r in cache.shards]
    buffer = bytearray(max(length for _, _, length in spans))
    reader, passes = _warm_stream(cache, layer)
    raw, stream = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes):
            for path, offset, length in spans:
                with open(path, "rb", buffering=0) as f:
                    f.seek(offset)
                    f.readinto(memoryview(buffer)[:length])
        raw.append(passes * cache.rows("train") / (time.perf_counter() - start))
        stream.append(_stream_rate(reader, passes))
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


def _warm_stream(cache: ActivationCache, layer: int | None = None) -> tuple[ActivationStream, int]:
    """A stream of one layer after a warm-up pass (arrays opened, pool faulted in), and how many passes
    make one steady measurement (a small cache is read several times)."""
    reader = ActivationStream(cache, StreamSpec([cache.layers[0] if layer is None else layer], 4096))
    sum(batch.shape[1] for batch in reader.batches(1))
    return reader, -(-STEADY_ROWS // cache.rows("train"))


def _stream_rate(reader: ActivationStream, passes: int) -> float:
    start = time.perf_counter()
    served = sum(batch.shape[1] for batch in reader.batches(passes))  # batches are (L, B, D)
    return served / (time.perf_counter() - start)


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
        fit.run(FitConfig(**{**base, "max_tokens": 8192}, out=str(Path(out) / "warm")))  # imports, first allocations
        start = time.perf_counter()
        for seed in range(4):
            fit.run(FitConfig(**base, seed=seed, out=str(Path(out) / "solo")))
        solo = time.perf_counter() - start
        start = time.perf_counter()
        fit.run(FitConfig(**base, sweep={"seed": [0, 1, 2, 3]}, out=str(Path(out) / "sweep")))
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


def bench_fsspec(path: str, repeats: int) -> dict[str, dict[str, float]]:
    """Rows/s of the shuffled stream of a one-layer cache from its local folder (one ``readinto`` per
    layer chunk) and from a copy in fsspec's in-process memory filesystem, which is read as an s3:// or
    gs:// cache is (zarr's FsspecStore, partial-shard decode): the fsspec path's own cost, no network."""
    import fsspec

    memory, where = fsspec.filesystem("memory"), f"/bench-fsspec/{Path(path).name}"
    memory.put(path, where, recursive=True)
    try:
        urls = {"local path": path, "fsspec memory://": f"memory:/{where}"}
        streams = {name: _warm_stream(ActivationCache.open(url)) for name, url in urls.items()}
        rates: dict[str, list[float]] = {name: [] for name in streams}
        for _ in range(repeats):  # interleaved, so that load from other jobs falls on both alike
            for name, (reader, passes) in streams.items():
                rates[name].append(_stream_rate(reader, passes))
                print(f"  {name}: {rates[name][-1]:,.0f} rows/s", file=sys.stderr)
    finally:
        memory.rm("/bench-fsspec", recursive=True)
    return {name: _stats(values) for name, values in rates.items()}


def bench_checksums(path: str, repeats: int) -> dict[str, dict[str, float]]:
    """Rows/s of a fresh stream's first epoch over a one-layer cache, the pass in which fit checks every array
    against its checksum, without and with that check (``verify``), interleaved; the files are in the page
    cache (a warm-up pass), so the stream and the hashing are measured, not the disk."""
    cache = ActivationCache.open(path)
    _warm_stream(cache)
    rates: dict[str, list[float]] = {"unchecked": [], "checked as read": []}
    for _ in range(repeats):
        for name, verify in zip(rates, (False, True)):
            rates[name].append(_stream_rate(ActivationStream(cache, StreamSpec(cache.layers, 4096, verify=verify)), 1))
            print(f"  {name}: {rates[name][-1]:,.0f} rows/s", file=sys.stderr)
    return {name: _stats(values) for name, values in rates.items()}


def rate_table(rates: dict[str, dict[str, float]], cache: ActivationCache, what: str, column: str) -> list[str]:
    """Rows/s of each stream in ``rates`` (the first is the baseline) as a table under ``what``."""
    mb = cache.d_model * np.dtype(cache.dtype).itemsize / 2**20  # MiB per row of the one layer
    base, first = next(iter(rates.items()))
    lines = [
        f"Shuffled stream, batch 4096, {cache.rows('train'):,} training rows of d = {cache.d_model} ({cache.dtype}); "
        f"{what}, medians with min-max.",
        "",
        f"| {column} | rows/s (min-max) | MiB/s | vs {base} |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {r['rows_per_s']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f}) | {r['rows_per_s'] * mb:,.0f} | "
        f"{r['rows_per_s'] / first['rows_per_s']:.2f}x |"
        for name, r in rates.items()
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="the shuffled stream: through fsspec, or with fit's checksum check")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--fsspec", metavar="CACHE", help="a one-layer cache folder on local disk: local vs fsspec")
    which.add_argument("--checksums", metavar="CACHE", help="a one-layer cache: first epoch unchecked vs checked")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="add the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.fsspec:
        rates, what, column = (
            bench_fsspec(args.fsspec, args.repeats),
            "steady state after a warm-up pass",
            "read through",
        )
        title = "cache reader through fsspec (issue 19)"
    else:
        rates, what, column = bench_checksums(args.checksums, args.repeats), "a fresh stream's first epoch", "stream"
        title = "the stream's first epoch with fit's checksum check"
    publish(
        rate_table(rates, ActivationCache.open(args.fsspec or args.checksums), what, column),
        title,
        "benchmarks.bench_io",
        args.write,
    )


if __name__ == "__main__":
    main()
