"""SAELens and sparsify checkpoints written by hand (no peer package), and an independent dense forward.

The layouts follow benchmarks/peers/NOTES.md (measured from sae-lens 6.54.12 and eai-sparsify 1.3.3).
``reference`` computes what those libraries compute, from *their* tensors and config, written here
from their definitions, never through sae-pipe's code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import GPT2Config

D, N = 64, 128  # the tiny Llama's width; latents


def their_tensors(arch: str, seed: int = 0, d: int = D, n: int = N) -> dict[str, torch.Tensor]:
    """Random SAELens tensors: non-unit decoder rows, biases and thresholds large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(d, n, generator=g) / d**0.5,
        "W_dec": torch.randn(n, d, generator=g) * (0.5 + torch.rand(n, 1, generator=g)),
        "b_dec": torch.randn(d, generator=g) * 0.3,
    }
    if arch == "gated":
        t.update(b_gate=torch.randn(n, generator=g) * 0.3, r_mag=torch.randn(n, generator=g) * 0.2)
        t["b_mag"] = torch.randn(n, generator=g) * 0.3
    else:
        t["b_enc"] = torch.randn(n, generator=g) * 0.3
    if arch == "jumprelu":
        t["threshold"] = torch.rand(n, generator=g) * 0.6
    return t


def write_saelens(
    folder: Path,
    arch: str = "topk",
    model: str | None = None,
    hook: str = "blocks.1.hook_resid_pre",
    legacy: bool = False,
    tensors: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A SAELens folder (6.x config, or a flat pre-6 one with ``legacy``); returns the config written.
    ``meta``: metadata fields (a 6.x config's ``metadata``; flat in a legacy one)."""
    t = tensors if tensors is not None else their_tensors(arch)
    n, d = t["W_dec"].shape
    k = options.pop("k", 8)
    if legacy:
        cfg: dict[str, Any] = {"d_in": d, "d_sae": n, "dtype": "float32", "hook_point": hook, "model_name": model}
        cfg.update({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": k}} if arch == "topk" else {})
        cfg.update({} if arch in ("standard", "topk") else {"architecture": arch})
        cfg.update(meta or {})
    else:
        metadata = {"sae_lens_version": "6.54.12", "hook_name": hook, "model_name": model, **(meta or {})}
        cfg = {"architecture": arch, "d_in": d, "d_sae": n, "dtype": "float32", "metadata": metadata}
        cfg.update({"k": k} if arch == "topk" else {})
    cfg.update(options)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({name: value.contiguous() for name, value in t.items()}, str(folder / "sae_weights.safetensors"))
    return cfg


def write_sparsify(
    root: Path, hookpoint: str = "layers.0", model: str | None = None, seed: int = 1, **options: Any
) -> Path:
    """A sparsify run folder with one hookpoint (and a run-level config.json naming ``model``)."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(N, D, generator=g)
    tensors = {
        "encoder.weight": torch.randn(N, D, generator=g) / D**0.5,
        "encoder.bias": torch.randn(N, generator=g) * 0.1,
        "W_dec": w_dec / w_dec.norm(dim=1, keepdim=True),
        "b_dec": torch.randn(D, generator=g) * 0.3,
    }
    cfg = {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": N, "k": 8}
    cfg.update({"multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **options})
    folder = root / hookpoint
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae.safetensors"))
    if model:
        (root / "config.json").write_text(json.dumps({"model": model, "batch_size": 8}))
    return folder


def reference(arch: str, t: dict[str, torch.Tensor], x: torch.Tensor, cfg: dict[str, Any]) -> tuple[Any, Any]:
    """(dense code (B, N), reconstruction (B, D)) as SAELens computes them, from its tensors and config."""
    norm = cfg.get("normalize_activations", "none")
    centre = x.mean(-1, keepdim=True) if cfg.get("_center") else torch.zeros(())  # TransformerLens's centred stream
    x = x - centre
    if norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x_in = (x - mu) / (std + 1e-5)
    else:
        x_in = x * cfg["_scale"] if norm == "expected_average_only_in" else x
    sae_in = x_in - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    if arch == "gated":
        gate = (sae_in @ t["W_enc"] + t["b_gate"]) > 0
        z = gate * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    else:
        pre = sae_in @ t["W_enc"] + t["b_enc"]
        if arch == "topk":
            norms = t["W_dec"].norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else torch.ones(len(pre[0]))
            values, idx = (pre * norms).topk(cfg.get("k", 8), dim=-1)
            z = torch.zeros_like(pre).scatter(-1, idx, values.relu())
            out = (z / norms) @ t["W_dec"] + t["b_dec"]
        else:
            z = pre.relu() * (pre > t["threshold"]) if arch == "jumprelu" else pre.relu()
    if arch != "topk":
        out = z @ t["W_dec"] + t["b_dec"]
    if norm == "layer_norm":
        out = out * std + mu
    elif norm == "expected_average_only_in":
        out = out / cfg["_scale"]
    return z, out + centre


def bad_checkpoints(tmp: Path, model: str) -> dict[str, str]:
    """One folder per way a checkpoint can be wrong (tests/test_bad_inputs.py), plus a good one."""
    sl = {name: tmp / name for name in ("good_sl", "no_bdec", "extra", "shape", "arch", "mlp", "nan", "pickle")}
    write_saelens(sl["good_sl"], "topk", model)
    without_bdec = their_tensors("topk")
    del without_bdec["b_dec"]
    write_saelens(sl["no_bdec"], "topk", model, tensors=without_bdec)
    write_saelens(sl["extra"], "topk", model, tensors={**their_tensors("topk"), "scaling_factor": torch.ones(N)})
    transposed = their_tensors("topk")
    transposed["W_enc"] = transposed["W_enc"].T.contiguous()
    write_saelens(sl["shape"], "topk", model, tensors={**transposed})
    write_saelens(sl["arch"], "batchtopk", model, tensors=their_tensors("topk"), k=8)
    write_saelens(sl["mlp"], "topk", model, "blocks.1.hook_mlp_out")
    poisoned = their_tensors("topk")
    poisoned["W_dec"][3, 5] = float("nan")
    write_saelens(sl["nan"], "topk", model, tensors=poisoned)
    write_saelens(sl["pickle"], "topk", model)
    weights = sl["pickle"] / "sae_weights.safetensors"
    torch.save(their_tensors("topk"), sl["pickle"] / "sae_weights.pt")
    weights.unlink()
    places = {name: str(path) for name, path in sl.items()}
    write_saelens(tmp / "renamed", "topk", model)
    torch.save(their_tensors("topk"), tmp / "renamed" / "sae_weights.safetensors")
    write_saelens(tmp / "cnr", "topk", model, normalize_activations="constant_norm_rescale")
    write_saelens(tmp / "avg", "topk", model, normalize_activations="expected_average_only_in")
    write_saelens(tmp / "hookz", "topk", model, "blocks.1.attn.hook_z", reshape_activations="hook_z")
    write_saelens(tmp / "gpt2", "topk", "gpt2")
    write_saelens(tmp / "nomodel", "topk", None)
    write_saelens(tmp / "several" / "a", "topk", model)
    write_saelens(tmp / "several" / "b", "topk", model)
    write_saelens(tmp / "narrow", "topk", model, tensors=their_tensors("topk", d=32))
    write_saelens(tmp / "last", "topk", model, "blocks.3.hook_resid_post")
    write_saelens(tmp / "jumprelu", "jumprelu", model)
    (tmp / "nodin").mkdir()
    (tmp / "nodin" / "cfg.json").write_text(json.dumps({"d_sae": N, "architecture": "standard"}))
    (tmp / "badjson").mkdir()
    (tmp / "badjson" / "cfg.json").write_text("{not json")
    (tmp / "badjson" / "sae_weights.safetensors").write_bytes(b"")
    (tmp / "empty").mkdir()
    _numeric_and_field_cases(tmp, model)
    write_sparsify(tmp / "transcoder", model=model, transcode=True)
    write_sparsify(tmp / "skip", model=model, skip_connection=True)
    write_sparsify(tmp / "mlpsp", "layers.1.mlp", model)
    for name in ("renamed", "cnr", "avg", "hookz", "gpt2", "nomodel", "several", "narrow", "last", "jumprelu"):
        places[name] = str(tmp / name)
    for name in ("nodin", "badjson", "empty", "transcoder", "skip", "mlpsp", *NUMERIC_AND_FIELD_CASES):
        places[name] = str(tmp / name)
    return places


NUMERIC_AND_FIELD_CASES = ("textdin", "halfk", "zerosae", "sphalfk", "sprun", "uncentred", "revision", "unknownfield")


def _numeric_and_field_cases(tmp: Path, model: str) -> None:
    """Configs with a bad number, an unmapped or unknown field, or an unstated centring (one folder each)."""
    write_saelens(tmp / "textdin", "topk", model, d_in="wide")
    write_saelens(tmp / "halfk", "topk", model, k=8.5)
    write_saelens(tmp / "zerosae", "topk", model, d_sae=0)
    write_sparsify(tmp / "sphalfk", "layers.0", model, k=2.5)
    write_sparsify(tmp / "sprun", "layers.0", model)
    gpt2 = tmp / "gpt2-config"  # a LayerNorm model's config is all import reads of it
    GPT2Config(vocab_size=50, n_embd=D, n_layer=4, n_head=4).save_pretrained(gpt2)
    write_saelens(tmp / "uncentred", "topk", str(gpt2), legacy=True)  # pre-6, no model_from_pretrained_kwargs
    write_saelens(tmp / "revision", "topk", model, meta={"model_from_pretrained_kwargs": {"revision": "step1000"}})
    write_saelens(tmp / "unknownfield", "topk", model, decoder_scale=2.0)
