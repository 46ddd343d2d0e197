"""extract: sae-pipe's extraction vs a bare transformers forward over the same batches."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.extract.corpus import builtin_documents
from pipeline.extract.packing import pack, token_stream
from pipeline.infra.files import Folder
from pipeline.llm.model import load_model, load_tokenizer, resolve_model

SEQS, CTX, BATCH = 64, 256, 8  # 16,384 tokens per measurement


def _bare(model: torch.nn.Module, batches: list[torch.Tensor], head: bool) -> float:
    """Tokens/s of the plain forward (with or without the LM head) over the batches."""
    start = time.perf_counter()
    with torch.inference_mode():
        run = model if head else model.get_submodule(str(model.base_model_prefix))  # the decoder without the LM head
        for ids in batches:
            run(input_ids=ids, use_cache=False)
    return sum(b.numel() for b in batches) / (time.perf_counter() - start)


def timed_extract(cfg: ExtractConfig) -> tuple[Folder, float]:
    """Extract ``cfg`` into a new cache; its folder and tokens/s (tokenize, forward to the layer, normalize,
    write; the model load excluded, as extract_log.json times it)."""
    folder = extract.run(cfg).folder
    log, manifest = folder.read_json("extract_log.json"), folder.read_json("manifest.json")
    return folder, manifest["sequences"] * cfg.ctx_len / log["seconds"]


def _ours(layer: int) -> float:
    """Tokens/s of `sae-pipe extract` of ~SEQS sequences at one layer, on the CPU."""
    with tempfile.TemporaryDirectory() as root:
        budget = SEQS * CTX - 2 * SEQS  # about SEQS sequences of stored rows (EOS positions are not stored)
        cfg = ExtractConfig(
            layers=str(layer),
            ctx_len=CTX,
            max_tokens=budget,
            batch_size=BATCH,
            cache_root=root,
            device="cpu",
            dataset="builtin",
            shard_mb=8,
        )
        return timed_extract(cfg)[1]


def bench_extract(repeats: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    source = resolve_model("smollm2-135m")
    tokenizer, model = load_tokenizer(source), load_model(source, torch.device("cpu"), torch.float32)
    rows = [torch.from_numpy(tokens).long() for tokens, _ in _first_rows(tokenizer)]
    batches = [torch.stack(rows[i : i + BATCH]) for i in range(0, SEQS, BATCH)]
    runs: dict[str, list[float]] = {
        "bare forward (LM head)": [],
        "bare forward (no head)": [],
        "extract layer 3": [],
        "extract layer 29 (top)": [],
    }
    for _ in range(repeats):
        runs["bare forward (LM head)"].append(_bare(model, batches, head=True))
        runs["bare forward (no head)"].append(_bare(model, batches, head=False))
        runs["extract layer 3"].append(_ours(3))
        runs["extract layer 29 (top)"].append(_ours(29))
        print("  extract: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in runs.items()), file=sys.stderr)
    return {name: {"tokens_per_s": statistics.median(v), "min": min(v), "max": max(v)} for name, v in runs.items()}


def _first_rows(tokenizer: object) -> list:
    rows = []
    for row in pack(token_stream(builtin_documents(), tokenizer), CTX):
        rows.append(row)
        if len(rows) == SEQS:
            return rows
    return rows
