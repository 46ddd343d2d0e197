"""Test helpers: a synthetic activation cache with a known sparse dictionary behind it, a tiny extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.cache.backends import get_backend
from pipeline.cache.compact import quantize
from pipeline.cache.manifest import cache_key, finish_manifest, new_manifest
from pipeline.cache.writer import commit_shard
from pipeline.extract.config import ExtractConfig
from pipeline.infra.files import Folder


def sparse_data(rng: np.random.Generator, rows: int, dictionary: np.ndarray, active: int) -> np.ndarray:
    """Rows that are non-negative combinations of ``active`` random atoms of ``dictionary``."""
    n_atoms, d = dictionary.shape
    ids = np.stack([rng.choice(n_atoms, active, replace=False) for _ in range(rows)])  # (rows, active)
    coef = rng.uniform(0.5, 2.0, size=(rows, active)).astype(np.float32)
    return np.einsum("ra,rad->rd", coef, dictionary[ids])


def synthetic_cache(
    root: Path,
    shard_rows: list[int],
    layers: tuple[int, ...] = (0, 1),
    d: int = 32,
    n_atoms: int = 64,
    active: int = 3,
    seed: int = 0,
    backend: str = "memmap",
    heldout_rows: int = 16,
    ctx_len: int = 8,
    normalization: dict | None = None,
    dtype: str = "float16",
) -> Folder:
    """A complete cache whose rows are sparse in a known dictionary (one per layer), stored as ``dtype``."""
    rng = np.random.default_rng(seed)
    dictionaries = [rng.standard_normal((n_atoms, d)).astype(np.float32) for _ in layers]
    for dictionary in dictionaries:
        dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    spec = {
        "model": {"name": "synthetic", "sha256": str(seed)},
        "layers": list(layers),
        "backend": backend,
        "dtype": dtype,
        "ctx_len": ctx_len,
        "corpus": {"dataset": "synthetic"},
        "shard_rows": shard_rows,
        "normalization": normalization,
    }
    folder = Folder.at(root).child("activations", cache_key(spec))
    folder.makedirs("shards")
    facts = {
        "n_layers_model": max(layers) + 1,
        "d_model": d,
        "normalization": normalization or {"method": "none", "eps": 1e-6, "scales": {}},
    }
    manifest = new_manifest(folder.name, spec, facts)
    folder.write_json(manifest, "manifest.json")
    records = [
        commit_shard(
            folder,
            get_backend(backend),
            i,
            _stored(_shard(rng, rows, heldout_rows, dictionaries, active, ctx_len, i), dtype),
            _record(rows, heldout_rows, ctx_len),
        )
        for i, rows in enumerate(shard_rows)
    ]
    folder.write_json(finish_manifest(manifest, records, exhausted=True), "manifest.json")
    return folder


def _record(rows: int, heldout_rows: int, ctx_len: int) -> dict:
    return {
        "first_seq": 0,
        "n_seqs": (rows + heldout_rows) // ctx_len,
        "rows": {"train": rows, "heldout": heldout_rows},
        "skipped_special": 0,
    }


def _shard(
    rng: np.random.Generator,
    rows: int,
    heldout_rows: int,
    dictionaries: list[np.ndarray],
    active: int,
    ctx_len: int,
    index: int,
) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", rows), ("heldout", heldout_rows)):
        arrays[f"{split}/act"] = np.stack([sparse_data(rng, n, dic, active) for dic in dictionaries]).astype(np.float16)
        # token = a unique id per row, so tests can tell rows apart
        arrays[f"{split}/token"] = (np.arange(n) + index * 1_000_000 + (500_000 if split == "heldout" else 0)).astype(
            np.int32
        )
        arrays[f"{split}/doc"] = np.full(n, index, dtype=np.int32)
        arrays[f"{split}/pos"] = (np.arange(n) % ctx_len).astype(np.uint16)
    n_seqs = max(heldout_rows // ctx_len, 1)
    arrays["heldout/seq"] = (np.arange(heldout_rows) // ctx_len).clip(max=n_seqs - 1).astype(np.int32)
    arrays["heldout/sequences"] = rng.integers(1, 100, size=(n_seqs, ctx_len)).astype(np.int32)
    arrays["heldout/sequence_docs"] = np.full((n_seqs, ctx_len), index, dtype=np.int32)
    arrays["heldout/sequence_index"] = np.arange(n_seqs, dtype=np.int32)
    return arrays


def _stored(arrays: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The float16 activations of a shard as int8 codes and scales, when the cache is int8."""
    if dtype == "float16":
        return arrays
    for split in ("train", "heldout"):
        codes, scale = quantize(torch.from_numpy(arrays[f"{split}/act"]))
        arrays[f"{split}/act"], arrays[f"{split}/scale"] = codes.numpy(), scale.numpy()
    return arrays


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, except the timing log (seconds and rates differ between runs by nature)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "extract_log.json"
    }


TINY_EXTRACT = {"layers": "1,3", "ctx_len": 32, "max_tokens": 1500, "batch_size": 4, "shard_mb": 0.02, "device": "cpu"}


def tiny_extract_config(model_dir: Path, root: Path, **changes: object) -> ExtractConfig:
    """A small multi-shard extraction of a tiny model (1500 rows, layers 1 and 3), with ``changes``."""
    return ExtractConfig(**{**TINY_EXTRACT, "model": str(model_dir), "cache_root": str(root), **changes})


def tiny_extract_args(model_dir: Path, root: Path, backend: str = "zarr", dataset: Path | None = None) -> list[str]:
    """The same extraction as `sae-pipe extract` arguments (a local ``dataset`` spares a fresh process the
    seconds it takes to gather the built-in corpus)."""
    argv = ["extract", "--model", str(model_dir), "--cache-root", str(root), "--backend", backend]
    argv += ["--dataset", str(dataset)] if dataset else []
    for key, value in TINY_EXTRACT.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv
