"""The peers' half of `make check-peers`; runs in .bench-venv (sae-lens, eai-sparsify), never imports sae-pipe.

    .bench-venv/bin/python benchmarks/peers/peer_side.py WORK

Reads WORK/raw.npy (real SmolLM2 residual-stream rows) and WORK/cases_a.json (sae-pipe's exports),
then writes, as each package computes them:
  (a) WORK/a/<case>.npz: code (dense, (B, N)) and out (B, D) of every export, loaded with the package,
      and WORK/a/<case>.json the class the package loaded it as;
  (b) WORK/b/<case>/: an SAE created and saved with the package's own API (random weights, every
      supported architecture and convention; SAELens's BatchTopK and Matryoshka BatchTopK trainers saved
      as SAELens's training runner saves them, save_inference_model), WORK/b/<case>.npz its code and out
      on the raw rows, as the package computes them once it has loaded the folder,
      and WORK/cases_b.json listing them;
  transcoders both ways (peer_transcoders.py), on WORK/mlp_in.npy (real MLP-input rows).
WORK/versions.json records the package versions.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import peer_transcoders  # this folder (the script's own) is on sys.path
import torch

D_SAE, K, SCALE = 2048, 16, 0.05  # latents, top-k, the expected_average factor (SmolLM2 rows are long)
LAYER_HOOK = "blocks.6.hook_resid_pre"  # our layer 6; sparsify's layers.5
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def dense(acts: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(len(acts), n).scatter(-1, indices.long(), acts.float())


def saelens_outputs(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        code = sae.encode(x)
        return code, sae.decode(code)


def sparsify_outputs(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        acts, indices, _ = sae.encode(x)
        return dense(acts, indices, sae.num_latents), sae.decode(acts, indices)


def save(path: Path, code: torch.Tensor, out: torch.Tensor, **extra: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"code": code.numpy(), "out": out.numpy(), **{k: v.numpy() for k, v in extra.items()}}
    np.savez(path, **arrays)


def load_exports(work: Path) -> None:
    """(a) sae-pipe's exports, loaded with each package's own loader."""
    from sae_lens import SAE
    from sparsify import SparseCoder

    for case in json.loads((work / "cases_a.json").read_text()):
        x = torch.from_numpy(np.load(work / case["input"]))
        if case["package"] == "saelens":
            sae = SAE.load_from_disk(case["folder"])
            code, out = saelens_outputs(sae, x)
        else:
            sae = SparseCoder.load_from_disk(case["folder"])
            code, out = (peer_transcoders.sparsify_forward if case.get("transcoder") else sparsify_outputs)(sae, x)
        save(work / "a" / f"{case['name']}.npz", code, out)
        (work / "a" / f"{case['name']}.json").write_text(json.dumps({"loaded": type(sae).__name__}))


def randomize(sae: torch.nn.Module, x: torch.Tensor, seed: int) -> None:
    """Random weights on the scale of the real rows, so that every bias and threshold matters."""
    g = torch.Generator().manual_seed(seed)
    params = dict(sae.named_parameters())
    d = x.shape[1]
    with torch.no_grad():
        params["W_enc"].copy_(torch.randn(params["W_enc"].shape, generator=g) / d**0.5)
        params["W_dec"].copy_(
            torch.randn(params["W_dec"].shape, generator=g) * (0.5 + torch.rand(D_SAE, 1, generator=g))
        )
        params["b_dec"].copy_(x.mean(0) + x.std(0) * 0.2 * torch.randn(d, generator=g))
        spread = float(((x - x.mean(0)) @ params["W_enc"]).std())  # typical encoder pre-activation
        for name in ("b_enc", "b_gate", "b_mag"):
            if name in params:
                params[name].copy_(torch.randn(D_SAE, generator=g) * 0.3 * spread)
        if "r_mag" in params:
            params["r_mag"].copy_(torch.randn(D_SAE, generator=g) * 0.2)
        if "threshold" in params:
            params["threshold"].copy_(torch.rand(D_SAE, generator=g) * spread)


def saelens_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    no_bias_in = {"apply_b_dec_to_input": False}
    return {
        "standard": ("standard", {}),
        "standard-no-b_dec-in": ("standard", no_bias_in),
        "standard-layer_norm": ("standard", {"normalize_activations": "layer_norm"}),
        "standard-resid-post": ("standard", {"hook": "blocks.5.hook_resid_post"}),
        "topk": ("topk", {"k": K}),
        "topk-rescale-no-b_dec-in": ("topk", {"k": K, "rescale_acts_by_decoder_norm": True, **no_bias_in}),
        "topk-expected-average": ("topk", {"k": K, "normalize_activations": "expected_average_only_in"}),
        "jumprelu": ("jumprelu", {}),
        "jumprelu-no-b_dec-in-layer_norm": ("jumprelu", {**no_bias_in, "normalize_activations": "layer_norm"}),
        "gated": ("gated", {}),
        "gated-no-b_dec-in": ("gated", no_bias_in),
    }


def make_saelens(work: Path, x: torch.Tensor) -> list[dict[str, Any]]:
    """(b) SAEs built and saved with SAELens's API."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.activation_scaler import ActivationScaler

    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
    }
    cases = []
    for seed, (name, (arch, options)) in enumerate(saelens_variants().items()):
        options = dict(options)
        hook = options.pop("hook", LAYER_HOOK)
        sae_cls, cfg_cls = classes[arch]
        sae = sae_cls(
            cfg_cls(d_in=x.shape[1], d_sae=D_SAE, metadata=SAEMetadata(model_name=MODEL, hook_name=hook), **options)
        )
        randomize(sae, x, seed)
        folder = work / "b" / name
        sae.save_model(folder)
        x_in = x
        if options.get("normalize_activations") == "expected_average_only_in":  # what SAELens's trainer feeds it
            scaler = ActivationScaler(scaling_factor=SCALE)
            scaler.save(str(folder / "activation_scaler.json"))
            x_in = scaler.scale(x)
        code, out = saelens_outputs(sae, x_in)
        if x_in is not x:
            out = scaler.unscale(out)
        save(work / "b" / f"{name}.npz", code, out)
        cases.append({"name": name, "package": "saelens", "arch": arch, "folder": str(folder)})
    return cases


def make_saelens_trainers(work: Path, x: torch.Tensor) -> list[dict[str, Any]]:
    """(b) BatchTopK and Matryoshka BatchTopK training SAEs saved in their inference form (a jumprelu SAE, the
    decoder norms folded in, the batch threshold on every latent), then loaded back with SAE.load_from_disk."""
    import sae_lens
    from sae_lens import SAE
    from sae_lens.saes.sae import SAEMetadata

    trainers = {
        "batchtopk": (sae_lens.BatchTopKTrainingSAE, sae_lens.BatchTopKTrainingSAEConfig, {}),
        "matryoshka": (
            sae_lens.MatryoshkaBatchTopKTrainingSAE,
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig,
            {"matryoshka_widths": [D_SAE // 8, D_SAE // 2, D_SAE]},
        ),
    }
    cases = []
    for seed, (arch, (sae_cls, cfg_cls, options)) in enumerate(trainers.items(), start=50):
        meta = SAEMetadata(model_name=MODEL, hook_name=LAYER_HOOK)
        sae = sae_cls(cfg_cls(d_in=x.shape[1], d_sae=D_SAE, k=K, metadata=meta, **options))
        randomize(sae, x, seed)
        with torch.no_grad():  # a threshold inside the spread of the (decoder-norm rescaled) pre-activations
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # (B, N)
            sae.topk_threshold.fill_(float((pre * sae.W_dec.norm(dim=-1)).relu().quantile(0.99)))
        name = f"{sae_cls.__name__}-saved"
        folder = work / "b" / name
        sae.save_inference_model(folder)
        code, out = saelens_outputs(SAE.load_from_disk(folder), x)
        save(work / "b" / f"{name}.npz", code, out)
        cases.append({"name": name, "package": "saelens", "arch": arch, "folder": str(folder)})
    return cases


def make_sparsify(work: Path, x: torch.Tensor) -> list[dict[str, Any]]:
    """(b) SAEs built and saved with sparsify's API, in a run folder naming the model."""
    from sparsify import SparseCoder, SparseCoderConfig

    cases = []
    for seed, multi in enumerate((False, True)):
        name = "sparsify-topk-multi_topk" if multi else "sparsify-topk"
        sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=D_SAE, k=K, multi_topk=multi), dtype=torch.float32)
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            sae.encoder.bias.copy_(torch.randn(D_SAE, generator=g) * 0.1)
            sae.b_dec.copy_(x.mean(0))
        root = work / "b" / name
        sae.save_to_disk(root / "layers.5")
        (root / "config.json").write_text(json.dumps({"model": MODEL}))
        code, out = sparsify_outputs(sae, x)
        with torch.no_grad():
            fwd = sae(x)  # with multi_topk: the 4k-latent code and reconstruction
        forward_code = dense(fwd.latent_acts, fwd.latent_indices, sae.num_latents)
        save(work / "b" / f"{name}.npz", code, out, forward=fwd.sae_out, forward_code=forward_code)
        cases.append({"name": name, "package": "sparsify", "arch": "topk", "folder": str(root), "multi_topk": multi})
    return cases


def main(work: Path) -> None:
    torch.set_num_threads(2)
    x = torch.from_numpy(np.load(work / "raw.npy"))
    load_exports(work)
    cases = make_saelens(work, x) + make_saelens_trainers(work, x) + make_sparsify(work, x)
    mlp_in = peer_transcoders.load_input(work)
    if mlp_in is not None:
        cases += peer_transcoders.make(work, mlp_in, save)
    (work / "cases_b.json").write_text(json.dumps(cases, indent=1))
    versions = {p: importlib.metadata.version(p) for p in ("sae-lens", "eai-sparsify", "torch")}
    (work / "versions.json").write_text(json.dumps(versions))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
