"""The peers' half of `make check-peers` for transcoders (peer_side.py runs it; never imports sae-pipe).

Reads WORK/mlp_in.npy (real SmolLM2 MLP-input rows) and writes, as each package computes them:
  (a) the outputs of sae-pipe's transcoder exports: sparsify's `SparseCoder` forward (its code and its
      prediction, the skip path included), SAELens's `SAE.load_from_disk` encode and decode;
  (b) transcoders made and saved with each package's own API, random weights: sparsify's SparseCoder with
      transcode (with and without skip_connection) in its MLP hookpoint folder, and SAELens's TopK SAE with
      apply_b_dec_to_input false between the MLP's input and output hooks, as SAELens has no TopK transcoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

D_SAE, K, LAYER = 2048, 16, 6
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
INPUT = "mlp_in.npy"


def sparsify_forward(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's own forward: its code and its prediction of the MLP's output (skip path included)."""
    with torch.no_grad():
        out = sae(x)
    code = torch.zeros(len(x), sae.num_latents).scatter(-1, out.latent_indices.long(), out.latent_acts.float())
    return code, out.sae_out


def randomize(params: dict[str, torch.nn.Parameter], x: torch.Tensor, seed: int) -> None:
    """Random weights on the scale of the real rows (a transcoder's decoder and skip start at zero)."""
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g) / d**0.5)
        enc = params["W_enc"].T if "W_enc" in params else params["encoder.weight"]  # (N, D)
        spread = float((x @ enc.T).std())  # typical encoder pre-activation
        bias = params["b_enc" if "b_enc" in params else "encoder.bias"]
        bias.copy_(torch.randn(bias.shape, generator=g) * 0.3 * spread)


def make(work: Path, x: torch.Tensor, save: Any) -> list[dict[str, Any]]:
    """(b) transcoders saved with each package's API, and their outputs on the MLP-input rows."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata
    from sparsify import SparseCoder, SparseCoderConfig

    cases = []
    for seed, skip in enumerate((False, True), start=200):
        name = "sparsify-skip-transcoder" if skip else "sparsify-transcoder"
        config = SparseCoderConfig(num_latents=D_SAE, k=K, transcode=True, skip_connection=skip)
        sae = SparseCoder(x.shape[1], config, dtype=torch.float32)
        randomize(dict(sae.named_parameters()), x, seed)
        root = work / "b" / name
        sae.save_to_disk(root / f"layers.{LAYER}.mlp")
        (root / "config.json").write_text(json.dumps({"model": MODEL}))
        save(work / "b" / f"{name}.npz", *sparsify_forward(sae, x))
        arch = "skip-transcoder" if skip else "transcoder"
        cases.append({"name": name, "package": "sparsify", "arch": arch, "folder": str(root), "transcoder": True})
    hooks = {"hook_name": f"blocks.{LAYER}.ln2.hook_normalized", "hook_name_out": f"blocks.{LAYER}.hook_mlp_out"}
    meta = SAEMetadata(model_name=MODEL, **hooks)
    sae = sae_lens.TopKSAE(
        sae_lens.TopKSAEConfig(d_in=x.shape[1], d_sae=D_SAE, k=K, apply_b_dec_to_input=False, metadata=meta)
    )
    randomize(dict(sae.named_parameters()), x, 210)
    folder = work / "b" / "saelens-topk-transcoder"
    sae.save_model(folder)
    with torch.no_grad():
        code = sae.encode(x)
        save(work / "b" / "saelens-topk-transcoder.npz", code, sae.decode(code))
    cases.append({"name": folder.name, "package": "saelens", "arch": "transcoder", "folder": str(folder)})
    return [{**case, "transcoder": True} for case in cases]


def load_input(work: Path) -> torch.Tensor | None:
    return torch.from_numpy(np.load(work / INPUT)) if (work / INPUT).is_file() else None
