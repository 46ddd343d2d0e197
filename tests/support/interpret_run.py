"""A small trained run to interpret (tiny random Llama, a few thousand tokens) and its interpret settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.reader import ActivationCache
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.extract.corpus import builtin_documents
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.files import Folder
from pipeline.interpret.config import InterpretConfig
from pipeline.llm.model import load_tokenizer, resolve_model
from pipeline.sae.folder import load_sae, save_weights


def train_run(model: Path, root: Path, layer: int = 2, tokens: int = 6000) -> str:
    """Extract ``layer`` of ``model`` over built-in documents (one full of markup among them), at most
    ``tokens`` rows, 30 % held out; fit a 128-latent SAE."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "docs.jsonl"
    docs = [{"text": d} for d in builtin_documents()[300 : 300 + tokens // 100]]
    docs.insert(3, {"text": "Watch out: <script>alert('owned')</script> is not markup here. " * 20})
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cache = extract.run(
        ExtractConfig(
            model=str(model),
            dataset=str(corpus),
            layers=str(layer),
            ctx_len=64,
            max_tokens=tokens,
            heldout=0.3,
            cache_root=str(root),
            device="cpu",
        )
    ).folder
    cfg = FitConfig(
        cache=cache.url,
        latents=128,
        k=8,
        batch_size=256,
        out=str(root / "saes"),
        device="cpu",
        precision="float32",
        epochs=2,
    )
    return fit.run(cfg).runs[0].url


def icfg(run: str, out: Path, **kw: object) -> InterpretConfig:
    """Interpret settings for tests: CPU, 6 features, 5 top examples, 2 requests in flight."""
    base = {
        "run": run,
        "out": str(out),
        "cache_root": str(out.parent),
        "device": "cpu",
        "features": 6,
        "top": 5,
        "concurrency": 2,
        "max_retries": 3,
    }
    return InterpretConfig(**{**base, **kw})  # type: ignore[arg-type]


def token_run(model: Path, root: Path, n_tokens: int = 40) -> tuple[str, dict[int, str]]:
    """A run whose latents are exact token detectors, for scorers to have a known truth: layer 0 (the
    embeddings, the same vector for every occurrence of a token), latent j fires on token t_j only (its
    encoder row is t_j's stored vector, its bias -3/4 of that vector's squared norm), the rest never fire.
    t_j: the most frequent held-out tokens whose text is a word of three letters or more. Returns the run
    and latent -> token text."""
    run = train_run(model, root, layer=0, tokens=16000)
    sae, cfg = load_sae(run)
    cache = ActivationCache.open(cfg["cache"]["path"])
    rows = np.concatenate([r[:, 0] for _, r in cache.heldout_rows([0])]).astype(np.float32)  # (R, D)
    ids = np.concatenate([cache.read(s["index"], "heldout/token") for s in cache.shards])[: len(rows)]
    tokenizer = load_tokenizer(resolve_model(str(model)))
    values, counts = np.unique(ids, return_counts=True)
    words = [int(t) for t in values[np.argsort(-counts, kind="stable")] if tokenizer.decode([int(t)]).strip().isalpha()]
    chosen = [t for t in words if len(tokenizer.decode([t]).strip()) >= 3][:n_tokens]
    vectors = torch.from_numpy(np.stack([rows[ids == t][0] for t in chosen]))  # (n, D)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1e4)
        sae.b_dec.zero_()
        sae.W_enc[: len(chosen)] = vectors
        sae.b_enc[: len(chosen)] = -0.75 * (vectors**2).sum(1)  # fires at cosine > 0.75: its own token only
        sae.W_dec[: len(chosen)] = vectors / vectors.norm(dim=1, keepdim=True)
    save_weights(Folder.at(run), sae)
    return run, {j: tokenizer.decode([t]).strip().lower() for j, t in enumerate(chosen)}
