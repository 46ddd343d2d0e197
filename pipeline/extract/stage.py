"""Stage one: run the LLM once over a corpus and store normalized hidden states of many layers.

The cache folder's name is a content key of the full spec (model file hash, corpus, packing,
layers, normalization, dtype, backend, budget), so an identical request returns the finished cache
without loading the model, and any difference gets a new folder.
"""

from __future__ import annotations

import itertools
import math
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.cache.backends import BACKENDS, STORE_DTYPES, get_backend
from pipeline.cache.manifest import cache_key, finish_manifest, new_manifest, read_manifest, shard_records
from pipeline.cache.normalize import METHODS, Normalizer
from pipeline.cache.writer import ShardWriter, committed_shards
from pipeline.extract.capture import Capturer
from pipeline.extract.config import ExtractConfig
from pipeline.extract.corpus import CorpusSpec, check_corpus, fingerprint_corpus, iter_documents
from pipeline.extract.packing import PackSpec, ShardPlan, pack, plan_shards, token_stream
from pipeline.infra.console import Bar, Stopwatch, progress_bar, say
from pipeline.infra.device import dtype_name, resolve_dtype
from pipeline.infra.distributed import Ranks
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder, Memo
from pipeline.infra.layout import Layout
from pipeline.infra.locks import exclusive
from pipeline.llm.layers import parse_layers
from pipeline.llm.model import (
    ModelSource,
    find_blocks,
    fingerprint_model,
    load_model,
    load_tokenizer,
    model_shape,
    resolve_model,
)
from pipeline.llm.sites import parse_sites

PACKING = "eos-joined, split_special_tokens, tail dropped, special positions not stored"


@dataclass
class Prepared:
    """The resolved request: where the cache lives and what it must contain (no model loaded)."""

    cfg: ExtractConfig
    source: ModelSource
    corpus: CorpusSpec
    spec: dict[str, Any]
    facts: dict[str, Any]
    folder: Folder
    device: torch.device  # where the model runs (this rank's GPU under torchrun)


def prepare(cfg: ExtractConfig, ranks: Ranks | None = None) -> Prepared:
    """Resolve model and corpus, fingerprint them and derive the cache key, all without a forward."""
    _check_config(cfg)
    root = Folder.at(cfg.cache_root)
    memo = Memo(root.local() / ".memo.json") if root.is_local else None  # remote roots: recompute hashes
    source = resolve_model(cfg.model, cfg.revision)
    model_id = fingerprint_model(source, memo)
    n_layers, d_model, max_positions = model_shape(source, model_id, memo, cfg.trust_remote_code)
    if max_positions is not None and cfg.ctx_len > max_positions:
        raise UserError(
            f"--ctx-len {cfg.ctx_len} is longer than the {max_positions} positions model {source.name!r} "
            "was built for; use --ctx-len of at most that."
        )
    layers = parse_layers(cfg.layers, n_layers)
    sites = parse_sites(cfg.sites)
    corpus = CorpusSpec(cfg.dataset, cfg.split, cfg.text_column, cfg.dataset_config)
    device = (ranks or Ranks()).device(cfg.device)
    itemsize = np.dtype(STORE_DTYPES[cfg.dtype]).itemsize
    seq_bytes = cfg.ctx_len * len(sites) * len(layers) * d_model * itemsize
    spec = {
        "model": {
            "name": source.name,
            "kind": source.kind,
            "file": source.gguf_file,
            "revision": source.revision,
            **model_id,
        },
        "compute_dtype": dtype_name(resolve_dtype(cfg.compute_dtype, device)),
        "corpus": {**asdict(corpus), **fingerprint_corpus(corpus, memo)},
        "packing": PACKING,
        "ctx_len": cfg.ctx_len,
        "layers": layers,
        **({"sites": sites} if sites != ["resid"] else {}),  # absent for residual-only caches: their keys stay
        "normalize": {"method": cfg.normalize, "eps": Normalizer().eps},
        "dtype": cfg.dtype,
        "backend": cfg.backend,
        "max_rows": cfg.max_tokens,
        "heldout": cfg.heldout,
        "seqs_per_shard": max(1, int(cfg.shard_mb * 2**20) // seq_bytes),
    }
    facts = {"n_layers_model": n_layers, "d_model": d_model}
    folder = Layout(cfg.cache_root).activations(cache_key(spec))
    return Prepared(cfg, source, corpus, spec, facts, folder, device)


def _check_config(cfg: ExtractConfig) -> None:
    if cfg.backend not in BACKENDS:
        raise UserError(f"unknown backend {cfg.backend!r}; use one of {', '.join(BACKENDS)}.")
    if cfg.dtype not in STORE_DTYPES:
        raise UserError(f"unknown stored dtype {cfg.dtype!r}; use one of {', '.join(STORE_DTYPES)}.")
    if cfg.normalize not in METHODS:
        raise UserError(f"unknown normalization {cfg.normalize!r}; use one of {', '.join(METHODS)}.")
    if not 2 <= cfg.ctx_len <= 65_535:
        raise UserError(f"--ctx-len {cfg.ctx_len} is out of range; use 2..65535.")
    if cfg.max_tokens < 0 or cfg.batch_size < 1:
        raise UserError("--max-tokens must be >= 0 (0 = whole corpus) and --batch-size >= 1.")
    if not 0 <= cfg.heldout < 1:
        raise UserError(f"heldout share {cfg.heldout} must be in [0, 1).")
    if not 0 < cfg.shard_mb < math.inf:
        raise UserError(f"--shard-mb {cfg.shard_mb} must be a finite number above 0.")
    if cfg.backend == "memmap" and not Folder.at(cfg.cache_root).is_local:
        raise UserError("the memmap backend needs a local --cache-root; use --backend zarr for URLs.")


@dataclass
class ExtractResult:
    """What extract left: a complete activation cache, extracted now, resumed or found."""

    folder: Folder  # <cache_root>/activations/<key>: manifest.json and the shards
    manifest: dict[str, Any]  # its manifest.json: key, rows per split, spec, normalization


def run(cfg: ExtractConfig, ranks: Ranks | None = None) -> ExtractResult:
    """A complete cache for ``cfg``, extracting (or resuming) it if needed."""
    folder = extracted(cfg, ranks)
    return ExtractResult(folder, read_manifest(folder))


def extracted(cfg: ExtractConfig, ranks: Ranks | None = None) -> Folder:
    """Return the folder of a complete cache for ``cfg``, extracting (or resuming) it if needed."""
    ranks = ranks or Ranks.from_env()
    prep = prepare(cfg, ranks)
    if _finished(prep):
        say(f"cache hit: {prep.folder.url}")
        return prep.folder
    check_corpus(prep.corpus)  # a wrong column fails before any folder is made
    prep.folder.makedirs("shards")
    with exclusive(prep.folder, "extract", enabled=ranks.world == 1):
        if not _finished(prep):
            fresh = not prep.folder.exists("manifest.json")
            try:
                _run(prep, ranks)
            except UserError:
                if fresh and ranks.is_main and not prep.folder.exists("manifest.json"):
                    prep.folder.remove()  # no manifest means no shard yet: bad input leaves nothing behind
                raise
    return prep.folder


def _finished(prep: Prepared) -> bool:
    if not prep.folder.exists("manifest.json"):
        return False
    manifest = read_manifest(prep.folder, need_complete=False)
    if manifest["spec"] != prep.spec:
        raise UserError(
            f"{prep.folder.url} holds a cache with a different spec under the same key; move it "
            "away (it may have been edited by hand) and re-run."
        )
    return manifest["status"] == "complete"


def _run(prep: Prepared, ranks: Ranks) -> None:
    """Extract every shard this rank owns that is not written yet, then finish the manifest."""
    folder, cfg = prep.folder, prep.cfg
    done = committed_shards(folder) if ranks.is_main else shard_records(folder)
    ranks.barrier()  # rank 0 has cleaned up stray shard folders before anyone writes
    _check_disk(prep, done)
    tokenizer = load_tokenizer(prep.source, cfg.trust_remote_code)
    pack_spec = PackSpec(cfg.ctx_len, cfg.heldout, prep.spec["seqs_per_shard"], cfg.max_tokens)
    sequences = pack(token_stream(iter_documents(prep.corpus), tokenizer), cfg.ctx_len)
    plans = plan_shards(sequences, list(tokenizer.all_special_ids), pack_spec)
    first = next(plans, None)
    if first is None or first.keep.sum() == 0:
        raise UserError(
            f"corpus {cfg.dataset!r} yields no rows: it is empty or shorter than one "
            f"--ctx-len {cfg.ctx_len} sequence. Use a bigger corpus or a smaller --ctx-len."
        )
    worker = _Worker(prep, ranks, first)
    clock = Stopwatch()
    try:
        with progress_bar("extract", cfg.max_tokens or None) as bar:
            for plan in itertools.chain([first], plans):
                if plan.index in done:
                    bar.advance(0, int(plan.keep.sum()))
                elif plan.index % ranks.world == ranks.rank:
                    worker.submit(plan, bar)
    except BaseException:
        worker.close(raise_errors=False)  # keep every finished shard; report the first error
        raise
    worker.close()
    ranks.barrier()
    if ranks.is_main:
        _finish(prep, worker.manifest, list(shard_records(folder).values()), clock.seconds)
    ranks.barrier()  # no rank returns before the manifest is complete


class _Worker:
    """Loads the model once, fixes the normalization, and feeds shards to the background writer."""

    def __init__(self, prep: Prepared, ranks: Ranks, first: ShardPlan) -> None:
        cfg = prep.cfg
        device = prep.device
        model = load_model(prep.source, device, resolve_dtype(cfg.compute_dtype, device), cfg.trust_remote_code)
        sites = prep.spec.get("sites", ["resid"])
        # The MLP sites are scaled, not standardized per token: a transcoder's output is mapped back to the
        # model by a constant, where a per-token std of the MLP's output would need the output it predicts.
        normalizers = {site: Normalizer(cfg.normalize if site == "resid" else "scale") for site in sites}
        blocks = find_blocks(model)
        self.capturer = Capturer(model, blocks, prep.spec["layers"], normalizers, cfg.dtype, cfg.batch_size, device)
        self.folder = prep.folder
        if ranks.is_main and not prep.folder.exists("manifest.json"):
            self.capturer.fit_scales(first)
            facts = {**prep.facts, **_normalization_facts(normalizers)}
            prep.folder.write_json(new_manifest(prep.folder.name, prep.spec, facts), "manifest.json")
        ranks.barrier()  # every rank reads the same normalization constants below
        self.manifest = read_manifest(prep.folder, need_complete=False)
        site_norms = self.manifest.get("site_normalization", {})
        for site in sites:
            self.capturer.normalizers[site] = Normalizer.from_dict(
                self.manifest["normalization"] if site == "resid" else site_norms[site]
            )
        self.writer = ShardWriter(prep.folder, get_backend(cfg.backend))

    def submit(self, plan: ShardPlan, bar: Bar) -> None:
        arrays = self.capturer.shard_arrays(plan, bar)
        record = {
            "first_seq": plan.first_seq,
            "n_seqs": len(plan.tokens),
            "rows": {"train": plan.rows(heldout=False), "heldout": plan.rows(heldout=True)},
            "skipped_special": plan.skipped,
        }
        self.writer.submit(plan.index, arrays, record)

    def close(self, raise_errors: bool = True) -> None:
        self.writer.close(raise_errors)


def _normalization_facts(normalizers: dict[str, Normalizer]) -> dict[str, Any]:
    """The manifest's ``normalization`` (the residual stream's, as always) and, with MLP sites, theirs."""
    others = {site: n.to_dict() for site, n in normalizers.items() if site != "resid"}
    return {"normalization": normalizers["resid"].to_dict(), **({"site_normalization": others} if others else {})}


def _check_disk(prep: Prepared, done: dict[int, dict[str, Any]]) -> None:
    """Print the estimated size; refuse up front when the disk cannot hold it."""
    cfg = prep.cfg
    itemsize = np.dtype(STORE_DTYPES[cfg.dtype]).itemsize
    blocks = len(prep.spec["layers"]) * len(prep.spec.get("sites", ["resid"]))
    per_row = blocks * prep.facts["d_model"] * itemsize + 10
    if cfg.max_tokens == 0:
        say(f"extracting {prep.folder.name}: whole corpus, {per_row:,} bytes per stored token")
        return
    left = max(cfg.max_tokens - sum(r["rows"]["train"] + r["rows"]["heldout"] for r in done.values()), 0)
    need = int(left * per_row * 1.02)
    say(
        f"extracting {prep.folder.name}: {cfg.max_tokens:,} rows x {len(prep.spec['layers'])} layer(s) x "
        f"{prep.facts['d_model']} ({cfg.dtype}) = about {need / 2**20:,.1f} MiB still to write"
    )
    if prep.folder.is_local:
        free = shutil.disk_usage(prep.folder.local()).free
        if need > free:
            raise UserError(
                f"not enough disk space for this cache: about {need / 2**30:.2f} GiB needed, "
                f"{free / 2**30:.2f} GiB free at {prep.folder.url}. Free space, lower --max-tokens "
                "or pick another --cache-root."
            )


def _finish(prep: Prepared, manifest: dict[str, Any], records: list[dict[str, Any]], seconds: float) -> None:
    rows = sum(r["rows"]["train"] + r["rows"]["heldout"] for r in records)
    exhausted = prep.cfg.max_tokens == 0 or rows < prep.cfg.max_tokens
    if exhausted and prep.cfg.max_tokens:
        say(f"[yellow]the corpus ran out after {rows:,} of {prep.cfg.max_tokens:,} requested rows[/]")
    prep.folder.write_json(finish_manifest(manifest, records, exhausted), "manifest.json")
    prep.folder.write_json(
        {
            "seconds": round(seconds, 2),
            "rows": rows,
            "device": str(prep.device),
            "rows_per_second": round(rows / max(seconds, 1e-9), 1),
        },
        "extract_log.json",
    )
