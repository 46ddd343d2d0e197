"""The int8 cache against float16 (issue 19): bytes per value, stream rows/s, and the held-out FVU of the
same SAE trained from each.

    python -m benchmarks.bench_compact --cache CACHE --repeats 3 --write

The int8 cache is the float16 cache's rows re-encoded shard by shard with the extractor's own
``quantize`` (so no second LLM forward is needed; the float16 rounding underneath is ~300x smaller than
int8's). Both SAEs are scored on the float16 cache's held-out rows. Never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("SAE_PIPE_QUIET", "1")

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.report import RESULTS, write_table
from pipeline.cache.backends import get_backend
from pipeline.cache.compact import quantize
from pipeline.cache.manifest import cache_key, finish_manifest, new_manifest
from pipeline.cache.reader import ActivationCache
from pipeline.cache.stream import ActivationStream, StreamSpec
from pipeline.cache.writer import commit_shard
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.files import Folder
from pipeline.sae.folder import load_sae
from pipeline.sae.quality import Reconstruction

ACT = ("train/act", "heldout/act")


def transcode(cache: ActivationCache, root: Path) -> ActivationCache:
    """An int8 copy of ``cache`` under ``root`` (every array kept, activations re-encoded)."""
    spec = {**cache.manifest["spec"], "dtype": "int8"}
    folder = Folder.at(root).child("activations", cache_key(spec))
    folder.makedirs("shards")
    facts = {k: cache.manifest[k] for k in ("n_layers_model", "d_model", "normalization")}
    manifest = new_manifest(folder.name, spec, facts)
    records = []
    for record in cache.shards:
        names = [n for n in record["checksums"] if "[" not in n] + list(ACT)
        arrays = {name: cache.read(record["index"], name) for name in names}
        for name in ACT:
            codes, scale = quantize(torch.from_numpy(arrays[name]))
            arrays[name], arrays[name.replace("act", "scale")] = codes.numpy(), scale.numpy()
        kept = {k: record[k] for k in ("first_seq", "n_seqs", "rows", "skipped_special")}
        records.append(commit_shard(folder, get_backend(spec["backend"]), record["index"], arrays, kept))
    folder.write_json(finish_manifest(manifest, records, cache.manifest["corpus_exhausted"]), "manifest.json")
    return ActivationCache.open(folder)


def stream_rate(cache: ActivationCache, layer: int) -> float:
    """Rows per second of one epoch of the shuffled stream (batches of 4096, as fit reads them)."""
    stream = ActivationStream(cache, StreamSpec([layer], 4096))
    start = time.perf_counter()
    rows = sum(batch.shape[1] for batch in stream.batches(1))
    return rows / (time.perf_counter() - start)


def heldout_fvu(run: Folder, rows: np.ndarray) -> float:
    sae, _ = load_sae(run)
    quality = Reconstruction()
    with torch.no_grad():
        for start in range(0, len(rows), 4096):
            x = torch.from_numpy(rows[start : start + 4096]).float()  # (b, D)
            quality.add(x, sae(x).x_hat)
    return quality.fvu


def measure(f16: ActivationCache, i8: ActivationCache, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    layer = f16.layers[0]
    rates: dict[str, list[float]] = {"float16": [], "int8": []}
    for _ in range(args.repeats):  # interleaved, so that load from other jobs falls on both
        for name, cache in (("float16", f16), ("int8", i8)):
            rates[name].append(stream_rate(cache, layer))
    held = np.concatenate([r[:, 0] for _, r in f16.heldout_rows([layer])])  # (n, D) float32
    base = {"latents": args.latents, "k": args.k, "batch_size": 4096, "max_tokens": args.tokens, "device": "cpu"}
    fvu = {}
    for name, cache in (("float16", f16), ("int8", i8)):
        (run,) = fit.run(FitConfig(cache=cache.folder.url, **base, out=f"{tmp}/saes-{name}", log_every=1000)).runs
        fvu[name] = heldout_fvu(run, held)
    values = f16.rows("train") + f16.rows("heldout")
    size = {
        name: c.manifest["bytes"] / (values * len(c.layers) * c.d_model) for name, c in (("float16", f16), ("int8", i8))
    }
    return {"rates": rates, "fvu": fvu, "bytes": size, "heldout": len(held)}


def table(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lines = [
        f"SAE: {args.latents} latents, k {args.k}, {args.tokens:,} training tokens (batch 4096, auto lr), the same "
        f"seeds and data order; FVU over the float16 cache's {r['heldout']:,} held-out rows. Stream: one epoch of "
        "the shuffled stream, batch 4096, from the page cache.",
        "",
        "| stored dtype | bytes per value (all files) | stream rows/s (min-max) | held-out FVU |",
        "|---|---|---|---|",
    ]
    for name in ("float16", "int8"):
        rates = r["rates"][name]
        lines.append(
            f"| {name} | {r['bytes'][name]:.3f} | "
            f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) "
            f"| {r['fvu'][name]:.4f} |"
        )
    rel = r["fvu"]["int8"] / r["fvu"]["float16"] - 1
    lines += [
        "",
        f"- FVU from int8 vs float16: {rel * 100:+.2f} % relative; "
        f"target within 1 %: {'yes' if abs(rel) <= 0.01 else '**no**'}",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a one-layer float16 cache")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="prepend the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    f16 = ActivationCache.open(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(f16, transcode(f16, Path(tmp)), args, tmp)
    lines = table(result, args)
    print("\n".join(lines))
    if args.write:
        command = (
            f"python -m benchmarks.bench_compact --cache CACHE --latents {args.latents} --k {args.k} "
            f"--tokens {args.tokens} --repeats {args.repeats} --write"
        )
        write_table(RESULTS, "the int8 cache (issue 19)", command, lines)


if __name__ == "__main__":
    main()
