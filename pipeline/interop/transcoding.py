"""Transcoders (pipeline/sae/archs/transcoder.py) in SAELens's and sparsify's layouts, both ways.

A transcoder reads block L's MLP input and predicts that MLP's output. The cache scales both MLP sites by one
factor per layer (cfg.json's ``site_normalization``: x_n = c_in x, y = y_n / c_out); exports fold the factors
into the weights, so the files take and give the model's own activations:

    W_enc' = c_in W_enc    W_dec' = W_dec / c_out    b_dec' = b_dec / c_out    W_skip' = W_skip c_in / c_out

* sparsify (eai-sparsify 1.3.3, sparse_coder.py): a ``SparseCoder`` with ``transcode: true`` (no pre-bias on the
  input, as ours) and ``skip_connection`` for the skip path (``W_skip (D, D)``, added as ``x W_skip^T``, as ours),
  in the hookpoint folder of the MLP module, ``layers.L.mlp`` (sparsify hooks the module's input and output).
* SAELens (6.54.12, saes/transcoder.py): its ``transcoder`` and ``skip_transcoder`` classes encode with a ReLU
  (and its ``jumprelu_*`` ones with a JumpReLU), none with a TopK, so none computes our code. A transcoder
  without a skip path is exactly SAELens's ``topk`` SAE with ``apply_b_dec_to_input: false`` (the code of the
  input alone, then ``z W_dec + b_dec``), saved with the transcoder's input hook ``blocks.L.ln2.hook_normalized``
  and output hook ``metadata.hook_name_out = blocks.L.hook_mlp_out``, as SAELens names a transcoder's two hooks.
  A skip transcoder has no SAELens form: refused, naming sparsify. Importing reads such topk files back (either
  ``apply_b_dec_to_input``), and SAELens's ReLU / JumpReLU (skip) transcoders as our inference-only
  ``relu_transcoder`` / ``jumprelu_transcoder`` (pipeline/sae/archs/transcoder.py): z = ReLU(x W_enc + b_enc),
  for JumpReLU times H(pre - threshold), y = z W_dec + b_dec (+ x W_skip^T), W_skip (d_out, d_in) as ours.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.normalize import Normalizer
from pipeline.infra.errors import UserError
from pipeline.interop.foreign import Foreign, check_fields, check_tensors, load_tensors, read_json, whole
from pipeline.interop.saelens import CFG as SAELENS_CFG
from pipeline.interop.saelens import WEIGHTS as SAELENS_WEIGHTS
from pipeline.interop.saelens import ours_layout, refuse_unmapped, saelens_files, settings
from pipeline.interop.saelens_fields import KNOWN
from pipeline.interop.sparsify import CFG as SPARSIFY_CFG
from pipeline.interop.sparsify import FIELDS, RENAME, run_model, sparsify_files
from pipeline.interop.sparsify import WEIGHTS as SPARSIFY_WEIGHTS
from pipeline.sae.interface import SaeConfig

IN_HOOK, OUT_HOOK = "blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out"  # SAELens / TransformerLens names
THRESHOLD = {  # SAELens's ReLU / JumpReLU transcoders -> our architecture, and whether it has a skip path
    "transcoder": ("relu_transcoder", False),
    "skip_transcoder": ("relu_transcoder", True),
    "jumprelu_transcoder": ("jumprelu_transcoder", False),
    "jumprelu_skip_transcoder": ("jumprelu_transcoder", True),
}
MLP_HOOK = re.compile(r"(?:[A-Za-z_][\w.]*\.)?(?:layers|h|blocks|layer)\.(\d+)\.(?:mlp|feed_forward|ffn)")


def site_scales(cfg: dict[str, Any]) -> tuple[float, float]:
    """The factors (c_in, c_out) a run's MLP sites were scaled by (1.0 where a site is stored as it is)."""
    layer = str(cfg["sae"]["layers"][0])
    sites = cfg["cache"].get("site_normalization", {})
    factors = []
    for site in ("mlp_in", "mlp_out"):
        norm = sites.get(site, {"method": "none"})
        if norm["method"] not in ("none", "scale"):
            raise UserError(f"the run's {site} site is normalized by {norm['method']}; exports fold `scale` only.")
        factors.append(float(norm["scales"][layer]) if norm["method"] == "scale" else 1.0)
    return factors[0], factors[1]


def folded(model: torch.nn.Module, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A transcoder's weights (float32) on the model's own activations: the sites' factors folded in."""
    c_in, c_out = site_scales(cfg)
    t = {name: value.detach().float().clone() for name, value in model.state_dict().items()}
    t.update(W_enc=t["W_enc"] * c_in, W_dec=t["W_dec"] / c_out, b_dec=t["b_dec"] / c_out)
    if "W_skip" in t:
        t["W_skip"] = t["W_skip"] * (c_in / c_out)  # (D, D)
    return t


def saelens_transcoder(
    tensors: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """cfg.json and weights of a transcoder in SAELens's layout: a TopK one without a skip path as its topk SAE of
    the MLP's two hooks; a ReLU / JumpReLU one (imported from SAELens) as its (jumprelu_)(skip_)transcoder."""
    sizes, layer, spec = cfg["sae"], cfg["sae"]["layers"][0], cfg["cache"]
    skip = bool(sizes.get("skip"))
    if sizes["arch"] == "transcoder" and skip:
        raise UserError(
            "SAELens has no TopK skip transcoder (its skip_transcoder encodes with a ReLU or a JumpReLU, which "
            "computes another code); export this skip transcoder with --format sparsify."
        )
    meta = {
        "model_name": spec["model"]["name"],
        "hook_name": IN_HOOK.format(layer),
        "hook_name_out": OUT_HOOK.format(layer),
        "context_size": spec["ctx_len"],
        "prepend_bos": False,
        "exclude_special_tokens": True,
        "exported_by": "sae-pipe",
        "sae_pipe_cache_key": spec["key"],
        "sae_pipe_normalization": {"method": "none"},
    }
    if sizes["arch"] == "transcoder":
        config, weights = saelens_files("topk", tensors, sizes, "none", meta)
        return {**config, "apply_b_dec_to_input": False}, weights
    jump = sizes["arch"] == "jumprelu_transcoder"
    config, weights = saelens_files("jumprelu" if jump else "standard", tensors, sizes, "none", meta)
    theirs = next(name for name, ours in THRESHOLD.items() if ours == (sizes["arch"], skip))
    config.update(architecture=theirs, apply_b_dec_to_input=False, d_out=sizes["d_in"])
    return config, {**weights, **({"W_skip": tensors["W_skip"].contiguous()} if skip else {})}


def sparsify_transcoder(
    tensors: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """cfg.json and weights of a (skip) transcoder as sparsify's transcoding SparseCoder."""
    config, weights = sparsify_files(tensors, cfg["sae"], {"method": "none"}, cfg["cache"]["model"]["name"])
    skip = bool(cfg["sae"].get("skip"))
    config.update(transcode=True, skip_connection=skip)
    return config, {**weights, **({"W_skip": tensors["W_skip"].contiguous()} if skip else {})}


def sparsify_hookpoint(layer: int) -> str:
    return f"layers.{layer}.mlp"


def is_transcoder(sae_dir: Path, fmt: str) -> bool:
    """Whether a checkpoint folder of ``fmt`` holds a transcoder (read by this module, not as an SAE)."""
    raw = read_json(sae_dir / (SAELENS_CFG if fmt == "saelens" else SPARSIFY_CFG))
    if fmt == "sparsify":
        return bool(raw.get("transcode"))
    meta = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
    return raw.get("architecture") in THRESHOLD or bool(meta.get("hook_name_out") or raw.get("hook_name_out"))


def read_saelens_transcoder(folder: Path) -> Foreign:
    """A SAELens transcoder as ours: a topk SAE from an MLP's input to its output (the form of our exports), or
    one of its ReLU / JumpReLU (skip) transcoders."""
    raw = read_json(folder / SAELENS_CFG)
    check_fields(raw, {*KNOWN, "d_out"}, folder / SAELENS_CFG, "SAELens")
    s = settings(raw)
    arch = str(s.get("architecture"))
    if arch != "topk" and arch not in THRESHOLD:
        raise UserError(
            f"checkpoint {folder} is SAELens's {arch} with an output hook; sae-pipe imports its topk SAEs of an MLP's "
            f"input and output and its {', '.join(THRESHOLD)} architectures."
        )
    d_in, d_sae = whole(s, "d_in", folder / SAELENS_CFG), whole(s, "d_sae", folder / SAELENS_CFG)
    k = whole(s, "k", folder / SAELENS_CFG) if arch == "topk" else 0
    match = re.fullmatch(r"blocks\.(\d+)\.ln2\.hook_normalized", str(s.get("hook_name")))
    if not match or s.get("hook_name_out") != OUT_HOOK.format(match[1]) or s.get("d_out", d_in) != d_in:
        raise UserError(
            f"checkpoint {folder} maps {s.get('hook_name')} to {s.get('hook_name_out')}; sae-pipe imports "
            "transcoders from blocks.L.ln2.hook_normalized (the MLP's input) to blocks.L.hook_mlp_out of one block."
        )
    if s.get("normalize_activations", "none") != "none":
        raise UserError(f"checkpoint {folder} normalizes its input ({s['normalize_activations']}); not mapped.")
    refuse_unmapped({**s, "hook_name_out": None}, "topk" if arch == "topk" else "relu", folder)
    tensors = load_tensors(folder, SAELENS_WEIGHTS)
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    ours_arch, skip = THRESHOLD.get(arch, ("transcoder", False))
    extra = {"threshold": (d_sae,)} if ours_arch == "jumprelu_transcoder" else {}
    check_tensors(folder, tensors, {**shapes, **extra, **({"W_skip": (d_in, d_in)} if skip else {})})
    notes = [f"SAELens's {arch} from the MLP's input to its output: our {ours_arch}; W_enc transposed"]
    ours = ours_layout("topk", tensors, {**s, "apply_b_dec_to_input": True}, notes)
    if arch == "topk" and s.get("apply_b_dec_to_input", True):  # its encoder subtracts the output's bias first
        ours["b_enc"] = ours["b_enc"] - ours["W_enc"] @ ours["b_dec"]  # (N,)
        notes.append("apply_b_dec_to_input true: W_enc^T b_dec taken from the encoder bias")
    layer = int(match[1])
    return Foreign(
        "saelens", folder, SaeConfig(ours_arch, d_in, d_sae, k, [layer], skip=skip), ours, Normalizer("none"),
        str(s["hook_name"]), s.get("model_name"), s.get("context_size"), notes, False,
        str(s.get("dtype")) if s.get("dtype") is not None else None,
    )  # fmt: skip


def read_sparsify_transcoder(folder: Path, hookpoint: str | None = None) -> Foreign:
    """A sparsify SparseCoder with ``transcode: true`` (and optionally ``skip_connection``) as our transcoder."""
    cfg = read_json(folder / SPARSIFY_CFG)
    check_fields(cfg, FIELDS, folder / SPARSIFY_CFG, "sparsify")
    if cfg.get("activation", "topk") != "topk":
        raise UserError(f"checkpoint {folder} has activation {cfg['activation']!r}; sae-pipe imports topk.")
    name = hookpoint or folder.name
    match = MLP_HOOK.fullmatch(name)
    if not match:
        raise UserError(
            f"checkpoint {folder} is a transcoder (transcode: true) at hookpoint {name!r}, which is not a block's MLP; "
            "sae-pipe imports transcoders of layers.L.mlp (or h.L.mlp, ...). Pass --hookpoint if renamed."
        )
    d_in, k = whole(cfg, "d_in", folder / SPARSIFY_CFG), whole(cfg, "k", folder / SPARSIFY_CFG, default=32)
    n = whole(cfg, "num_latents", folder / SPARSIFY_CFG, default=0, least=0) or d_in * whole(
        cfg, "expansion_factor", folder / SPARSIFY_CFG, default=32
    )
    if k >= n:
        raise UserError(f"k={k} in {folder / SPARSIFY_CFG} is not below its {n} latents; a top-k SAE keeps fewer.")
    skip = bool(cfg.get("skip_connection"))
    tensors = load_tensors(folder, SPARSIFY_WEIGHTS)
    shapes = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    check_tensors(folder, tensors, {**shapes, **({"W_skip": (d_in, d_in)} if skip else {})})
    ours = {RENAME.get(key, key): value.float() for key, value in tensors.items()}
    layer = int(match[1])
    notes = [f"hookpoint {name} (block {layer}'s MLP) = our transcoder at layer {layer}"]
    return Foreign(
        "sparsify", folder, SaeConfig("transcoder", d_in, n, k, [layer], skip=skip), ours, Normalizer("none"),
        name, cfg.get("sae_pipe_model") or run_model(folder), None, notes,
    )  # fmt: skip
