"""Writing a run in the folder layouts SAELens and sparsify load (their conventions: :mod:`pipeline.interop.saelens`,
:mod:`pipeline.interop.sparsify`; reading them back is `sae-pipe import`).

* ``saelens``: ``cfg.json`` + ``sae_weights.safetensors``; loads with ``sae_lens.SAE.load_from_disk``. Every
  single-layer architecture, as SAELens's inference classes name them (:data:`pipeline.interop.saelens.THEIRS`):
  topk, standard (relu), jumprelu and gated as themselves; batchtopk and matryoshka (at full size) as a jumprelu
  SAE whose every latent has the one batch threshold, as SAELens saves its own BatchTopK trainers. Per-token
  standardization maps to ``normalize_activations: layer_norm`` (SAELens adds 1e-5 to the std where we add
  1e-6, and scales back by std, not std + eps: close, not exact); an imported ``layer_norm`` maps back exactly;
  a `scale` factor is folded into the weights. The hook is ``blocks.L.hook_resid_pre``.
* ``sparsify``: ``layers.<L-1>/cfg.json`` + ``sae.safetensors``; loads with ``sparsify.SparseCoder.load_from_disk``.
  TopK only. sparsify hooks a block's *output*, so our layer L (input of block L) is its ``layers.<L-1>``.
  sparsify has no input normalization: with `standardize` the caller must standardize inputs and
  undo it on outputs (written to NOTE.md in the export). A `scale` factor is folded in.
RouteSAEs are not exported: neither library has a router. Transcoders: :mod:`pipeline.interop.transcoding`
(sparsify's transcoding SparseCoder in ``layers.L.mlp``; SAELens: a topk SAE of the MLP's two hooks, no skip path).
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.interop import transcoding
from pipeline.interop.saelens import OWN, THEIRS, saelens_files
from pipeline.interop.saelens import WEIGHTS as SAELENS_WEIGHTS
from pipeline.interop.sparsify import WEIGHTS as SPARSIFY_WEIGHTS
from pipeline.interop.sparsify import sparsify_files
from pipeline.sae.folder import load_sae
from pipeline.sae.interface import REGISTRY

FORMATS = ("saelens", "sparsify")


def export_run(run: str, fmt: str, out: str) -> Folder:
    """Write ``run`` in ``fmt`` under ``out``; return the folder a library loads from."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    model, cfg = load_sae(run)
    arch = cfg["sae"]["arch"]
    if REGISTRY[arch].sites == ("mlp_in", "mlp_out"):
        return _transcoder(model, cfg, fmt, out)
    if model.multi_layer:
        raise UserError("RouteSAEs cannot be exported: neither SAELens nor sparsify represents the layer router.")
    if arch not in THEIRS:
        raise UserError(f"sae-pipe has no SAELens form for {arch} SAEs; it exports {', '.join(sorted(THEIRS))}.")
    if fmt == "sparsify" and arch != "topk":
        raise UserError(
            f"sparsify holds TopK SAEs only; export this {arch} SAE with --format saelens (it takes "
            f"{', '.join(sorted(THEIRS))}); --format sparsify takes topk."
        )
    tensors, normalization = _folded(model, cfg)
    folder = _empty(out)
    if fmt == "saelens":
        return _saelens(folder, tensors, cfg, normalization)
    return _sparsify(folder, tensors, cfg, normalization)


def _empty(out: str) -> Folder:
    folder = Folder.at(out)
    if folder.exists() and folder.list():
        raise UserError(f"{out} exists and is not empty; choose a new --out folder (nothing was overwritten).")
    return folder


def _transcoder(model: nn.Module, cfg: dict[str, Any], fmt: str, out: str) -> Folder:
    """A (skip) transcoder: SAELens's topk SAE of the MLP's two hooks, or sparsify's transcoding SparseCoder."""
    tensors, layer = transcoding.folded(model, cfg), cfg["sae"]["layers"][0]
    if fmt == "saelens":
        config, weights = transcoding.saelens_transcoder(tensors, cfg)
        folder = _empty(out)
        folder.makedirs()
        folder.write_json(config, "cfg.json")
        save_file(weights, str(folder.local() / SAELENS_WEIGHTS))
        return folder
    if cfg["sae"]["arch"] != "transcoder":
        raise UserError(
            f"sparsify holds TopK transcoders only; export this {cfg['sae']['arch']} with --format saelens."
        )
    config, weights = transcoding.sparsify_transcoder(tensors, cfg)
    hookpoint = transcoding.sparsify_hookpoint(layer)
    target = _empty(out).child(hookpoint)
    target.makedirs()
    target.write_json(config, "cfg.json")
    save_file(weights, str(target.local() / SPARSIFY_WEIGHTS))
    return target


def _folded(model: nn.Module, cfg: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights (float32) with a `scale` normalization factor folded in (x' = c x), and the normalization left."""
    norm = cfg["cache"]["normalization"]
    tensors = {name: value.detach().float().clone() for name, value in model.state_dict().items()}
    if norm["method"] == "scale":
        c = float(norm["scales"][str(cfg["sae"]["layers"][0])])
        # W_enc(cx - b) = cW_enc(x - b/c); thresholds and gate/magnitude biases act after W_enc: unchanged
        tensors.update(W_enc=tensors["W_enc"] * c, W_dec=tensors["W_dec"] / c, b_dec=tensors["b_dec"] / c)
        return tensors, {"method": "none", **({"center": True} if norm.get("center") else {})}
    return tensors, norm


def _saelens(folder: Folder, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], norm: dict[str, Any]) -> Folder:
    spec, layer = cfg["cache"], cfg["sae"]["layers"][0]
    meta = {
        "model_name": spec["model"]["name"],
        "hook_name": f"blocks.{layer}.hook_resid_pre",
        "context_size": spec["ctx_len"],
        "prepend_bos": False,
        "exclude_special_tokens": True,
        "exported_by": "sae-pipe",
        "sae_pipe_cache_key": spec["key"],
        OWN: norm,
        # an imported SAE of a centred TransformerLens stream (LayerNorm model): SAELens loads the model so again
        **({"model_from_pretrained_kwargs": {"center_writing_weights": True}} if norm.get("center") else {}),
    }
    normalize = "layer_norm" if norm["method"] in ("standardize", "layer_norm") else "none"
    config, weights = saelens_files(cfg["sae"]["arch"], tensors, cfg["sae"], normalize, meta)
    folder.makedirs()
    folder.write_json(config, "cfg.json")
    save_file(weights, str(folder.local() / SAELENS_WEIGHTS))
    return folder


def _sparsify(folder: Folder, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], norm: dict[str, Any]) -> Folder:
    layer = cfg["sae"]["layers"][0]
    hookpoint = f"layers.{layer - 1}" if layer > 0 else "embed_tokens"
    target = folder.child(hookpoint)
    target.makedirs()
    config, weights = sparsify_files(tensors, cfg["sae"], norm, cfg["cache"]["model"]["name"])
    target.write_json(config, "cfg.json")
    save_file(weights, str(target.local() / SPARSIFY_WEIGHTS))
    note = (
        f"Exported by sae-pipe from {cfg['cache']['key'] or 'an imported SAE'} (layer {layer} = input of block "
        f"{layer}, which is sparsify's hookpoint {hookpoint}).\n"
    )
    if norm["method"] in ("standardize", "layer_norm"):
        eps = norm.get("eps", 1e-6)
        back = "std(x)" if norm["method"] == "layer_norm" else f"(std(x) + {eps:g})"
        note += (
            "sparsify cannot represent this SAE's input normalization. Standardize each token first, "
            f"x' = (x - mean(x)) / (std(x) + {eps:g}) over the hidden dimension (Bessel-corrected std), "
            f"encode/decode x', then map the output back: x_hat = x_hat' * {back} + mean(x).\n"
        )
    if norm.get("center"):
        note += "This SAE reads centred activations: subtract each token's mean over the hidden dimension "
        note += "first, and add it back to the output.\n"
    folder.write_bytes(note.encode(), "NOTE.md")
    return target
