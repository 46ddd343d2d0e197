"""The cache's ``manifest.json``: the full spec, the content key derived from it, and per-shard records.

A shard counts as written only once its record exists (``shards/NNNNNN.json``); the manifest with
``status: complete`` is written last, by one process, from those records. Nothing in it depends on
time or host, so an interrupted-and-resumed cache is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.infra.errors import CorruptError, IncompleteError, UserError
from pipeline.infra.files import Folder
from pipeline.llm.layers import layer_span

FORMAT = "sae-pipe/activations"
FORMAT_VERSION = 2  # 2: int8 caches (pipeline.cache.compact), which a version-1 reader would misread
LAYER_CONVENTION = (
    "layer L = residual stream entering block L = Hugging Face hidden_states[L] "
    "(0 = embeddings) = SAELens blocks.L.hook_resid_pre"
)
SPLITS = ("train", "heldout")


def site_arrays(site: str) -> tuple[str, str]:
    """A site's activation array and its int8 scale array: ``act`` / ``scale`` for the residual stream (as
    every cache has held them), ``mlp_in`` / ``mlp_in_scale`` and so on for the MLP sites."""
    return ("act", "scale") if site == "resid" else (site, f"{site}_scale")


def cache_key(spec: dict[str, Any]) -> str:
    """A readable prefix plus a hash of the whole spec: equal specs, equal folders."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    model = str(spec["model"]["name"]).rsplit("/", 1)[-1].removesuffix(".gguf").lower()
    model = "".join(c if c.isalnum() or c in "-._" else "-" for c in model)[:40]
    return f"{model}-{layer_span(spec['layers'])}-{digest}"


def shard_name(index: int) -> str:
    return f"{index:06d}"


def check_format(data: dict[str, Any], where: str, kind: str = FORMAT, version: int = FORMAT_VERSION) -> None:
    """Refuse files of another kind or a newer format instead of misreading them."""
    if data.get("format") != kind:
        raise CorruptError(f"{where} is not a {kind} file (format={data.get('format')!r}).")
    found = data.get("format_version")
    if not isinstance(found, int) or found > version:
        raise UserError(
            f"{where} has format version {found}, this sae-pipe reads up to {version}; "
            "upgrade sae-pipe (pip install -U sae-pipe) or re-create the file."
        )


def read_manifest(folder: Folder, need_complete: bool = True) -> dict[str, Any]:
    """The manifest of a cache folder, checked for format and (optionally) completeness."""
    if not folder.exists("manifest.json"):
        raise UserError(
            f"{folder.url} is not an activation cache (no manifest.json); run "
            "`sae-pipe extract` or `sae-pipe cache list` to find one."
        )
    try:
        manifest = folder.read_json("manifest.json")
    except ValueError as err:
        raise CorruptError(f"{folder.url}/manifest.json is not valid JSON ({err}).") from None
    check_format(manifest, f"{folder.url}/manifest.json")
    if need_complete and manifest.get("status") != "complete":
        done = len([n for n in folder.list("shards") if n.endswith(".json")])
        raise IncompleteError(
            f"cache {folder.url} is incomplete ({done} shard(s) written): re-run the same "
            "`sae-pipe extract` command to resume it."
        )
    return manifest


def shard_records(folder: Folder) -> dict[int, dict[str, Any]]:
    """The records (``shards/NNNNNN.json``) of the shards written so far, by shard index."""
    shards = folder.child("shards")
    return {int(n[:-5]): shards.read_json(n) for n in shards.list() if n.endswith(".json") and n[:-5].isdigit()}


def new_manifest(key: str, spec: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """The in-progress manifest written before the first shard."""
    return {
        "format": FORMAT,
        "format_version": 2 if spec["dtype"] == "int8" else 1,  # float16/float32 caches stay readable by 1
        "key": key,
        "status": "in_progress",
        "layer_convention": LAYER_CONVENTION,
        "spec": spec,
        **facts,
    }


def finish_manifest(manifest: dict[str, Any], records: list[dict[str, Any]], exhausted: bool) -> dict[str, Any]:
    """The complete manifest: totals and per-shard records, in shard order."""
    records = sorted(records, key=lambda r: r["index"])
    rows = {split: sum(r["rows"][split] for r in records) for split in SPLITS}
    return {
        **manifest,
        "status": "complete",
        "rows": {**rows, "total": rows["train"] + rows["heldout"]},
        "sequences": sum(r["n_seqs"] for r in records),
        "skipped_special_positions": sum(r["skipped_special"] for r in records),
        "corpus_exhausted": exhausted,
        "bytes": sum(r["bytes"] for r in records),
        "shards": records,
    }
