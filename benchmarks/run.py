"""Run every benchmark and prepend the results to benchmarks/RESULTS.md (older runs stay below).

    make bench                      # sets up .bench-venv with the peers, then runs this
    python -m benchmarks.run --repeats 3

Medians over repeats (contenders alternate, each in a fresh process where memory is measured),
min-max beside them, ratios against the targets of the benchmarks issue. Never run inside tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # no GGUF de-quantization bars in the log (before torch loads tqdm)

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from benchmarks.bench_extract import bench_extract
from benchmarks.bench_fit import bench_fit, gemm_limits
from benchmarks.bench_io import bench_disk, bench_reader, bench_sweep
from benchmarks.report import machine, prepend
from pipeline.cache.reader import ActivationCache
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.infra.device import keep_freed_memory
from pipeline.infra.params import build_config, load_params

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
LAYER = 12


class Caches(NamedTuple):
    main: ActivationCache  # the demo cache (params.yaml: SmolLM2 layer 12, whole built-in corpus), zarr
    memmap: ActivationCache  # layer 12 of 200k tokens, memmap: large enough not to sit in the CPU's caches
    route: ActivationCache  # 16 layers (RouteSAE's range) of 100k tokens
    small: list[ActivationCache]  # layers 3 and 12 of 20k tokens in both backends (the extract issue's example)

    def all(self) -> list[ActivationCache]:
        return [self.main, self.memmap, self.route, *self.small]


def caches() -> Caches:
    demo = build_config(ExtractConfig, load_params(ROOT / "params.yaml"), "extract", {}, shared=("model", "data"))
    return Caches(
        ActivationCache.open(extract.run(demo).folder),
        ActivationCache.open(extract.run(ExtractConfig(layers="12", max_tokens=200_000, backend="memmap")).folder),
        ActivationCache.open(extract.run(ExtractConfig(layers="route", max_tokens=100_000, shard_mb=256)).folder),
        [
            ActivationCache.open(extract.run(ExtractConfig(layers="3,12", max_tokens=20_000, backend=backend)).folder)
            for backend in ("zarr", "memmap")
        ],
    )


def training_rows(cache: ActivationCache, layer: int, scratch: Path) -> Path:
    """Every training row of ``layer``, shuffled, as a float32 .npy (loading it needs no conversion copy)."""
    pos = cache.layer_index(layer)
    train = np.concatenate([cache.read(r["index"], "train/act", pos) for r in cache.shards]).astype(np.float32)
    np.random.default_rng(0).shuffle(train)
    np.save(scratch / "train.npy", train)
    return scratch / "train.npy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()  # as `sae-pipe fit` does on CPU
    stores = caches()
    results: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as scratch:
        data = training_rows(stores.main, LAYER, Path(scratch))
        results["fit"] = bench_fit(data, args.fit_steps, args.repeats)
    results["gemm_limits"] = gemm_limits()
    results["extract"] = bench_extract(args.repeats)
    results["reader"] = [
        bench_reader(stores.main, LAYER, args.repeats, "zarr, 423k tokens, 1 layer"),
        bench_reader(stores.memmap, LAYER, args.repeats, "memmap, 200k tokens, 1 layer"),
    ]
    results["sweep"] = [
        bench_sweep(stores.main, 400_000, layer=LAYER, latents=1024, k=16),
        bench_sweep(stores.route, 94_000, arch="route", latents=1024, k=16),
    ]
    results["disk"] = bench_disk(stores.all())
    prepend(RESULTS, results, " ".join(["python -m benchmarks.run", *sys.argv[1:]]))
    print(RESULTS.read_text().split("\n## ")[1][:4000])


if __name__ == "__main__":
    main()
