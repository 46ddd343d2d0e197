"""What is in the cache root: listing caches, summarizing one, sampling its statistics."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.cache.manifest import read_manifest, shard_name
from pipeline.cache.reader import ActivationCache
from pipeline.infra.errors import UserError
from pipeline.infra.layout import Layout

STATS_ROWS = 4096  # rows sampled per layer for the mean/std check


def list_caches(cache_root: str) -> list[dict[str, Any]]:
    """One summary line per folder under ``<cache_root>/activations`` (incomplete ones included)."""
    root = Layout(cache_root).activations()
    found: list[dict[str, Any]] = []
    for name in root.list():
        folder = root.child(name)
        if name.startswith(".") or not folder.exists("manifest.json"):
            continue
        try:
            manifest = read_manifest(folder, need_complete=False)
        except UserError as err:
            found.append({"key": name, "status": f"unreadable: {err}"})
            continue
        spec = manifest["spec"]
        found.append(
            {
                "key": name,
                "status": manifest["status"],
                "model": spec["model"]["name"],
                "dataset": spec["corpus"]["dataset"],
                "layers": spec["layers"],
                "sites": spec.get("sites", ["resid"]),
                "rows": manifest.get("rows", {}).get("total"),
                "bytes": manifest.get("bytes"),
                "backend": spec["backend"],
                "path": folder.url,
            }
        )
    return found


def summarize(cache: ActivationCache) -> dict[str, Any]:
    """The manifest's facts without per-shard detail, plus disk use and sample statistics."""
    manifest = cache.manifest
    rows = manifest["rows"]
    layers = cache.layers
    blocks = len(layers) * len(cache.sites)  # (L, n, D) arrays per site
    data_bytes = rows["total"] * blocks * cache.d_model * np.dtype(manifest["spec"]["dtype"]).itemsize
    info = {key: value for key, value in manifest.items() if key != "shards"}
    info["path"] = cache.folder.url
    info["n_shards"] = len(manifest["shards"])
    info["disk"] = {
        "bytes": manifest["bytes"],
        "bytes_per_token_per_layer": manifest["bytes"] / max(rows["total"] * blocks, 1),
        "activation_bytes": data_bytes,
        "overhead_share": manifest["bytes"] / max(data_bytes, 1) - 1,
    }
    info["sample_stats"] = sample_stats(cache)
    return info


def sample_stats(cache: ActivationCache) -> dict[str, dict[str, float]]:
    """Per layer, over up to STATS_ROWS training rows: mean and spread of per-token mean, std, norm."""
    shard = next((r["index"] for r in cache.shards if r["rows"]["train"] > 0), None)
    if shard is None:
        return {}
    stats = {}
    for i, layer in enumerate(cache.layers):
        x = cache.layer_rows(shard, "train", i)[:STATS_ROWS]  # (N, D)
        token_mean, token_std = x.mean(axis=1), x.std(axis=1, ddof=1)
        stats[str(layer)] = {
            "rows": int(len(x)),
            "token_mean_avg": float(token_mean.mean()),
            "token_mean_absmax": float(np.abs(token_mean).max()),
            "token_std_avg": float(token_std.mean()),
            "token_std_min": float(token_std.min()),
            "token_std_max": float(token_std.max()),
            "norm_avg": float(np.linalg.norm(x, axis=1).mean()),
        }
    return stats


def repair_cache(where: str) -> list[int]:
    """Mark a cache unfinished and delete only its bad shards, so that extract rewrites exactly those."""
    cache = ActivationCache.open(where)
    bad = sorted({problem.shard for problem in cache.verify()})
    if not bad:
        return []
    final = ("rows", "sequences", "skipped_special_positions", "corpus_exhausted", "bytes", "shards")
    unfinished = {k: v for k, v in cache.manifest.items() if k not in final} | {"status": "in_progress"}
    cache.folder.write_json(unfinished, "manifest.json")  # first: a kill below leaves a resumable cache
    for index in bad:
        cache.folder.child("shards").remove(f"{shard_name(index)}.json")
        cache.folder.child("shards").remove(shard_name(index))
    return bad


def catalog_rows(caches: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """`sae-pipe cache list` table cells: key, status, model, layers, rows, MiB, backend."""
    return [
        (
            c["key"],
            c["status"],
            str(c.get("model", "")),
            str(c.get("layers", "")) + "".join(f" +{s}" for s in c.get("sites", []) if s != "resid"),
            f"{c['rows']:,}" if c.get("rows") else "-",
            f"{c['bytes'] / 2**20:,.1f}" if c.get("bytes") else "-",
            str(c.get("backend", "")),
        )
        for c in caches
    ]
