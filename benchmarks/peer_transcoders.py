"""sae-pipe's half of `make check-peers` for transcoders (benchmarks/check_peers.py runs it).

A cache of SmolLM2-135M's MLP sites at LAYER (the MLP's input and output, raw rows recovered from the sites'
one scale factor), a transcoder and a skip transcoder trained on it, exported to sparsify (both) and SAELens
(no skip path: SAELens has no TopK skip transcoder; pipeline/interop/transcoding.py), with our code and
MLP-output prediction on the raw MLP-input rows; the peers' half (benchmarks/peers/peer_transcoders.py)
loads the exports and saves transcoders of its own, which `compare` imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.normalize import Normalizer
from pipeline.cache.reader import ActivationCache
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.interop.export import export_run
from pipeline.llm.sites import SITES
from pipeline.sae.archs.transcoder import Transcoder
from pipeline.sae.folder import load_sae

INPUT = "mlp_in.npy"  # the raw MLP-input rows, in the work folder


def raw_rows(cache: ActivationCache, site: str, layer: int) -> np.ndarray:
    """Held-out rows of ``site`` as the model has them (the stored rows carry the site's scale factor)."""
    stored = np.concatenate([r[:, 0] for _, r in cache.split_rows("heldout", [layer], site=site)])
    return (stored / cache.site_normalizer(site).scales[layer]).astype(np.float32)


def transcoder_outputs(run: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Our dense code, MLP-output prediction and firing margins for the raw MLP-input rows ``x`` (B, D)."""
    sae, cfg = load_sae(run)
    assert isinstance(sae, Transcoder)
    norms = {site: Normalizer.from_dict(cfg["cache"]["site_normalization"][site]) for site in SITES[1:]}
    layer = cfg["sae"]["layers"][0]
    x_n = norms["mlp_in"].normalize(torch.from_numpy(x), layer)[0]  # (B, D)
    with torch.no_grad():
        latents = sae.encode(x_n)
        y_n = sae.output(x_n, latents)  # (B, D)
        pre = torch.addmm(sae.b_enc, x_n, sae.W_enc.t())  # (B, N): no pre-bias
        top = pre.relu().topk(sae.cfg.k + 1, dim=-1).values  # (B, k + 1)
        margin = pre - (top[:, -2:-1] + top[:, -1:]) / 2  # against the midpoint of the k-th and (k+1)-th
    code = torch.zeros(len(x), sae.cfg.n_latents).scatter(-1, latents.indices, latents.acts)
    scale = norms["mlp_out"].scales.get(layer, 1.0) if norms["mlp_out"].method == "scale" else 1.0
    return code.numpy(), (y_n / scale).numpy(), margin.numpy()


def prepare(work: Path, model: str, layer: int, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The MLP-site cache, our transcoders, their exports and our outputs; the (a) cases."""
    config = ExtractConfig(
        model=model, layers=str(layer), ctx_len=128, max_tokens=6144, heldout=0.25, normalize="none",
        dtype="float32", sites=",".join(SITES), cache_root=str(work / "cache"),
    )  # fmt: skip
    cache = extract.run(config).folder.url
    x = raw_rows(ActivationCache.open(cache), "mlp_in", layer)
    np.save(work / INPUT, x)
    cases = []
    for skip in (False, True):
        run = (
            fit.run(FitConfig(cache=cache, arch="transcoder", skip=skip, layer=layer, precision="float32", **settings))
            .runs[0]
            .url
        )
        arch = "skip-transcoder" if skip else "transcoder"
        for package in ("sparsify",) if skip else ("sparsify", "saelens"):
            name = f"{package}-{arch}"
            folder = export_run(run, package, str(work / "exports" / name)).url
            np.savez(work / "a" / f"{name}.ours.npz", *transcoder_outputs(run, x))
            cases.append({"name": name, "package": package, "arch": arch, "folder": folder, "exact": True})
    return [{**case, "input": INPUT, "transcoder": True} for case in cases]
