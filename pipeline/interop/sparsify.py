"""sparsify's layout and conventions, both ways (measured from eai-sparsify 1.3.3: benchmarks/peers/NOTES.md).

A run folder holds one subfolder per hookpoint (``layers.6/cfg.json`` + ``sae.safetensors`` with
``encoder.weight (N, D)``, ``encoder.bias``, ``W_dec (N, D)``, ``b_dec``) and, when trained from the
command line, a run-level ``config.json`` naming the ``model``.

* A hookpoint ``<blocks>.i`` (``layers.i``, ``h.i``, ``gpt_neox.layers.i``...) is the *output* of block
  i, our layer i + 1; ``embed_tokens`` / ``embed_in`` is the embedding output, our layer 0. Hookpoints
  inside a block (``layers.6.mlp``) are not the residual stream: refused.
* Only ``activation: topk`` SAEs are imported. ``multi_topk`` only adds a training loss: the SAE is
  imported with its k (sparsify's `encode`; its `forward` then returns the 4k reconstruction, which
  ``--infer-k 4k`` reproduces). Transcoders (``transcode``, with or without ``skip_connection``) are read by
  :mod:`pipeline.interop.transcoding`; a skip connection on an SAE of the residual stream is refused.
* sparsify has no input normalization. sae-pipe's own exports record theirs (and the model) in extra
  ``sae_pipe_*`` keys that sparsify ignores.
* Every field of the hookpoint's cfg.json is in :data:`FIELDS`; any other field is refused. The run-level
  config.json is training settings (optimizer, batch, which hookpoints, k decay); only its ``model`` is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.normalize import Normalizer
from pipeline.infra.errors import UserError
from pipeline.interop.foreign import Foreign, check_arch, check_fields, check_tensors, load_tensors, read_json, whole
from pipeline.sae.interface import SaeConfig

CFG, WEIGHTS, RUN_CFG = "cfg.json", "sae.safetensors", "config.json"
BLOCK_OUTPUT = re.compile(r"(?:[A-Za-z_][\w.]*\.)?(?:layers|h|blocks|layer)\.(\d+)")
EMBEDDINGS = ("embed_tokens", "embed_in", "model.embed_tokens", "gpt_neox.embed_in")
RENAME = {"encoder.weight": "W_enc", "encoder.bias": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}  # theirs -> ours
FIELDS = {  # every field of sparsify 1.3.3's SparseCoderConfig (+ d_in and ours) and what import does with it
    "activation": "topk imported; groupmax refused",
    "d_in": "the input width",
    "num_latents": "the dictionary size (0: d_in * expansion_factor, as sparsify reads it)",
    "expansion_factor": "the dictionary size when num_latents is 0",
    "k": "the latents kept per token",
    "multi_topk": "a training loss only; imported at k (see the note it leaves)",
    "skip_connection": "a transcoder's W_skip path (pipeline.interop.transcoding); refused on an SAE",
    "transcode": "a transcoder of an MLP (pipeline.interop.transcoding)",
    "normalize_decoder": "irrelevant: keeps decoder rows unit-norm while training; encode/decode use W_dec as stored",
    "sae_pipe_normalization": "sae-pipe's exports: the normalization the SAE expects",
    "sae_pipe_model": "sae-pipe's exports: the model",
}


def is_sparsify(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / CFG).is_file() and "d_sae" not in read_json(folder / CFG)


def hookpoint_layer(hookpoint: str, where: Path) -> int:
    """Our layer index for a sparsify hookpoint."""
    if hookpoint in EMBEDDINGS:
        return 0
    match = BLOCK_OUTPUT.fullmatch(hookpoint)
    if not match:
        raise UserError(
            f"checkpoint {where} reads hookpoint {hookpoint!r}, which is not a block's output (the residual "
            "stream); sae-pipe imports sparsify SAEs on layers.i (or h.i, ...) and embed_tokens. Pass "
            "--hookpoint if the folder was renamed."
        )
    return int(match[1]) + 1


def read_sparsify(folder: Path, hookpoint: str | None = None) -> Foreign:
    """One sparsify hookpoint folder in our conventions; ``hookpoint`` overrides the folder's name."""
    cfg = read_json(folder / CFG)
    check_fields(cfg, FIELDS, folder / CFG, "sparsify")
    check_arch(str(cfg.get("activation", "topk")), folder, {"topk": "topk"})
    if cfg.get("skip_connection") and not cfg.get("transcode"):
        raise UserError(
            f"checkpoint {folder} is an SAE with a skip connection (skip_connection: true, transcode: false); "
            "sae-pipe imports skip paths on transcoders only (W_skip from an MLP's input to its output)."
        )
    if "d_in" not in cfg:
        raise UserError(f"{folder / CFG} lacks d_in; it is not a complete sparsify config.")
    d_in, k = whole(cfg, "d_in", folder / CFG), whole(cfg, "k", folder / CFG, default=32)
    n = whole(cfg, "num_latents", folder / CFG, default=0, least=0) or d_in * whole(
        cfg, "expansion_factor", folder / CFG, default=32
    )
    if k >= n:
        raise UserError(f"k={k} in {folder / CFG} is not below its {n} latents; a top-k SAE keeps fewer.")
    name = hookpoint or folder.name
    layer = hookpoint_layer(name, folder)
    tensors = load_tensors(folder, WEIGHTS)
    check_tensors(
        folder, tensors, {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    )
    notes = [f"hookpoint {name} (output of block {layer - 1}) = our layer {layer}" if layer else "embeddings = layer 0"]
    if cfg.get("multi_topk"):
        notes.append(f"multi_topk: imported with k={k}; sparsify's forward returns the {4 * k}-latent reconstruction")
    normalization = Normalizer.from_dict(cfg.get("sae_pipe_normalization") or {"method": "none"})
    return Foreign(
        "sparsify",
        folder,
        SaeConfig("topk", d_in, n, k, [layer]),
        {RENAME[name]: value.float() for name, value in tensors.items()},
        normalization,
        name,
        cfg.get("sae_pipe_model") or run_model(folder),
        None,
        notes,
    )


def run_model(folder: Path) -> str | None:
    """The model named by the run-level config.json (sparsify's command line writes it)."""
    for where in (folder.parent / RUN_CFG, folder.parent.parent / RUN_CFG):
        if where.is_file():
            model = read_json(where).get("model")
            return str(model) if model else None
    return None


def sparsify_files(
    tensors: dict[str, torch.Tensor], sizes: dict[str, int], normalization: dict[str, Any], model: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """cfg.json and the weights of a TopK SAE in sparsify's layout."""
    config = {
        "activation": "topk",
        "expansion_factor": max(sizes["n_latents"] // sizes["d_in"], 1),
        "normalize_decoder": True,
        "num_latents": sizes["n_latents"],
        "k": sizes["k"],
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sizes["d_in"],
        "sae_pipe_normalization": normalization,
        "sae_pipe_model": model,
    }
    return config, {theirs: tensors[ours].contiguous() for theirs, ours in RENAME.items()}
