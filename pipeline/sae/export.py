"""Writing a TopK run in the folder layouts SAELens and sparsify load, and reading them back.

* ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc (d_in, d_sae)``, ``b_enc``,
  ``W_dec (d_sae, d_in)``, ``b_dec``; loads with ``sae_lens.SAE.load_from_disk``. Per-token
  standardization maps to ``normalize_activations: layer_norm`` (SAELens adds 1e-5 to the std where
  we add 1e-6); a `scale` factor is folded into the weights. The hook is ``blocks.L.hook_resid_pre``.
* ``sparsify``: ``layers.<L-1>/cfg.json`` + ``sae.safetensors`` with ``encoder.weight (N, d)``,
  ``encoder.bias``, ``W_dec (N, d)``, ``b_dec``; loads with ``sparsify.SparseCoder.load_from_disk``.
  sparsify hooks a block's *output*, so our layer L (input of block L) is its ``layers.<L-1>``.
  sparsify has no input normalization: with `standardize` the caller must standardize inputs and
  undo it on outputs (written to NOTE.md in the export). A `scale` factor is folded in.
RouteSAEs are not exported: neither library has a router.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.sae.folder import load_sae
from pipeline.sae.topk import SaeConfig, TopKSAE

FORMATS = ("saelens", "sparsify")
SAELENS_VERSION = "6.54.12"  # the version whose loader this layout was checked against


def export_run(run: str, fmt: str, out: str) -> Folder:
    """Write ``run`` in ``fmt`` under ``out``; return the folder a library loads from."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    model, cfg = load_sae(run)
    if not isinstance(model, TopKSAE):
        raise UserError("RouteSAEs cannot be exported: neither SAELens nor sparsify represents the layer router.")
    tensors, method = _folded(model, cfg)
    layer = cfg["sae"]["layers"][0]
    folder = Folder.at(out)
    if folder.exists() and folder.list():
        raise UserError(f"{out} exists and is not empty; choose a new --out folder (nothing was overwritten).")
    if fmt == "saelens":
        return _saelens(folder, tensors, cfg, method, layer)
    return _sparsify(folder, tensors, cfg, method, layer)


def _folded(model: TopKSAE, cfg: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Weights with a `scale` normalization factor folded in (x' = c x), and the remaining method."""
    norm = cfg["cache"]["normalization"]
    params = (model.W_enc, model.b_enc, model.W_dec, model.b_dec)
    w_enc, b_enc, w_dec, b_dec = (p.detach().float().clone() for p in params)
    if norm["method"] == "scale":
        c = float(norm["scales"][str(cfg["sae"]["layers"][0])])
        w_enc, w_dec, b_dec = w_enc * c, w_dec / c, b_dec / c  # W_enc(cx - b) = cW_enc(x - b/c)
        return {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}, "none"
    return {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}, norm["method"]


def _saelens(folder: Folder, t: dict[str, torch.Tensor], cfg: dict[str, Any], method: str, layer: int) -> Folder:
    spec = cfg["cache"]
    config = {
        "architecture": "topk",
        "d_in": cfg["sae"]["d_in"],
        "d_sae": cfg["sae"]["n_latents"],
        "k": cfg["sae"]["k"],
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "reshape_activations": "none",
        "normalize_activations": "layer_norm" if method == "standardize" else "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "model_name": spec["model"]["name"],
            "hook_name": f"blocks.{layer}.hook_resid_pre",
            "context_size": spec["ctx_len"],
            "prepend_bos": False,
            "exclude_special_tokens": True,
            "exported_by": "sae-pipe",
            "sae_pipe_cache_key": spec["key"],
        },
    }
    folder.makedirs()
    folder.write_json(config, "cfg.json")
    save_file(
        {
            "W_enc": t["W_enc"].T.contiguous(),
            "b_enc": t["b_enc"],
            "W_dec": t["W_dec"].contiguous(),
            "b_dec": t["b_dec"],
        },
        str(folder.local() / "sae_weights.safetensors"),
    )
    return folder


def _sparsify(folder: Folder, t: dict[str, torch.Tensor], cfg: dict[str, Any], method: str, layer: int) -> Folder:
    hookpoint = f"layers.{layer - 1}" if layer > 0 else "embed_tokens"
    target = folder.child(hookpoint)
    target.makedirs()
    n, d = cfg["sae"]["n_latents"], cfg["sae"]["d_in"]
    target.write_json(
        {
            "activation": "topk",
            "expansion_factor": max(n // d, 1),
            "normalize_decoder": True,
            "num_latents": n,
            "k": cfg["sae"]["k"],
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": d,
            "sae_pipe_normalization": method,
        },
        "cfg.json",
    )
    save_file(
        {
            "encoder.weight": t["W_enc"].contiguous(),
            "encoder.bias": t["b_enc"],
            "W_dec": t["W_dec"].contiguous(),
            "b_dec": t["b_dec"],
        },
        str(target.local() / "sae.safetensors"),
    )
    note = (
        f"Exported by sae-pipe from cache {cfg['cache']['key']} (layer {layer} = input of block {layer}, "
        f"which is sparsify's hookpoint {hookpoint}).\n"
    )
    if method == "standardize":
        note += (
            "sparsify cannot represent this SAE's input normalization. Standardize each token first, "
            "x' = (x - mean(x)) / (std(x) + 1e-6) over the hidden dimension (Bessel-corrected std), "
            "encode/decode x', then map the output back: x_hat = x_hat' * (std(x) + 1e-6) + mean(x).\n"
        )
    folder.write_bytes(note.encode(), "NOTE.md")
    return target


def load_export(folder: str) -> tuple[TopKSAE, str]:
    """Rebuild our TopKSAE from an exported folder (either format); also return its input normalization."""
    root = Folder.at(folder)
    cfg = root.read_json("cfg.json")
    if root.exists("sae_weights.safetensors"):
        t = load_file(str(root.local() / "sae_weights.safetensors"))
        sae_cfg = SaeConfig("topk", int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"]))
        weights = {"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
        method = "standardize" if cfg.get("normalize_activations") == "layer_norm" else "none"
    else:
        t = load_file(str(root.local() / "sae.safetensors"))
        sae_cfg = SaeConfig("topk", int(cfg["d_in"]), int(cfg["num_latents"]), int(cfg["k"]))
        weights = {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
        method = cfg.get("sae_pipe_normalization", "none")  # sparsify ignores keys it does not know
    model = TopKSAE(sae_cfg)
    model.load_state_dict(weights)
    return model.eval(), method
