"""Round-trip check of the peer libraries' on-disk SAE formats.

Run inside the bench venv:

    /work/main/.bench-venv/bin/python benchmarks/peers/check_formats.py [OUT_DIR]

For each library this writes a tiny TopK SAE *by hand* (random tensors, a
hand-written cfg.json, safetensors written with `safetensors.torch.save_file`),
loads it back with the library's own loader, and checks the loaded module's
forward pass against a reference written here from the format's definition.
It prints the cfg.json files it used, so NOTES.md can quote them.

Nothing here imports code from the peers except their public loaders/modules.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore")

D_IN, N_LAT, K = 16, 64, 4


def _topk_ref(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense TopK code: keep the k largest pre-activations (after ReLU)."""
    vals, idx = pre.topk(k, dim=-1)
    out = torch.zeros_like(pre)
    out.scatter_(-1, idx, vals.relu())
    return out


def _write(folder: Path, cfg: dict, tensors: dict, weights_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / weights_name))


def check_sparsify(root: Path) -> None:
    from sparsify import SparseCoder

    g = torch.Generator().manual_seed(1)
    enc_w = torch.randn(N_LAT, D_IN, generator=g)  # (num_latents, d_in), nn.Linear layout
    enc_b = torch.randn(N_LAT, generator=g) * 0.1
    w_dec = torch.randn(N_LAT, D_IN, generator=g)  # (num_latents, d_in) -- NOT d_in-major
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    b_dec = torch.randn(D_IN, generator=g) * 0.1
    tensors = {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec}

    variants: dict[str, dict[str, Any]] = {
        # Minimal: everything except d_in has a dataclass default (expansion_factor=32,
        # activation="topk", normalize_decoder=True, ...). num_latents overrides expansion.
        "minimal": {"d_in": D_IN, "num_latents": N_LAT, "k": K},
        # Exactly what SparseCoder.save_to_disk writes.
        "full": {
            "activation": "topk",
            "expansion_factor": 32,
            "normalize_decoder": True,
            "num_latents": N_LAT,
            "k": K,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": D_IN,
        },
    }
    x = torch.randn(8, D_IN, generator=g)
    ref = _topk_ref((x - b_dec) @ enc_w.T + enc_b, K) @ w_dec + b_dec
    for name, cfg in variants.items():
        folder = root / f"sparsify_{name}" / "layers.6"
        _write(folder, cfg, tensors, "sae.safetensors")
        sae = SparseCoder.load_from_disk(folder)
        with torch.no_grad():
            out = sae(x)
        err = (out.sae_out - ref).abs().max().item()
        print(
            f"[sparsify/{name}] loaded {type(sae).__name__} d_in={sae.d_in} "
            f"num_latents={sae.num_latents} k={sae.cfg.k}; max|out-ref|={err:.2e}"
        )
        assert err < 1e-5, err
        assert torch.equal(sae.W_dec.data, w_dec), "W_dec changed on load"
        print("cfg.json:", json.dumps(cfg))

    # SAELens ships a converter for sparsify folders; see whether it round-trips.
    try:
        from sae_lens import SAE
        from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

        s = SAE.load_from_disk(root / "sparsify_full" / "layers.6", converter=sparsify_disk_loader)
        with torch.no_grad():
            out = s(x.to(s.dtype)).float()
        print(
            f"[sae_lens<-sparsify] loaded {type(s).__name__} dtype={s.dtype} "
            f"W_dec={tuple(s.W_dec.shape)} max|out-ref|={(out - ref).abs().max().item():.2e}"
        )
    except Exception as e:  # noqa: BLE001 -- we only report
        print(f"[sae_lens<-sparsify] FAILED: {type(e).__name__}: {str(e)[:300]}")


def check_saelens(root: Path) -> None:
    from sae_lens import SAE

    g = torch.Generator().manual_seed(2)
    w_enc = torch.randn(D_IN, N_LAT, generator=g)  # (d_in, d_sae)
    b_enc = torch.randn(N_LAT, generator=g) * 0.1
    w_dec = torch.randn(N_LAT, D_IN, generator=g)  # (d_sae, d_in)
    b_dec = torch.randn(D_IN, generator=g) * 0.1
    tensors = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    x = torch.randn(8, D_IN, generator=g) * 3 + 1

    def ref_fn(x, rescale=False, apply_b_dec=True, layer_norm=False):
        xin = x
        if layer_norm:
            mu = x.mean(-1, keepdim=True)
            sd = (x - mu).std(-1, keepdim=True)  # unbiased (correction=1)
            xin = (x - mu) / (sd + 1e-5)
        pre = (xin - b_dec * apply_b_dec) @ w_enc + b_enc
        nrm = w_dec.norm(dim=-1)
        if rescale:
            pre = pre * nrm
        z = _topk_ref(pre, K)
        if rescale:
            z = z / nrm
        out = z @ w_dec + b_dec
        if layer_norm:
            out = out * sd + mu
        return out

    meta = {
        "sae_lens_version": "6.54.12",
        "dtype": "float32",
        "model_name": "gpt2",
        "hook_name": "blocks.6.hook_resid_post",
    }
    variants = {
        # Minimal post-6.0 config. "dtype" is REQUIRED on disk (the disk loader reads
        # cfg_dict["dtype"] before dataclass defaults apply); "device" is filled in by
        # load_from_disk(device="cpu"). Other defaults: apply_b_dec_to_input True,
        # normalize_activations "none", rescale_acts_by_decoder_norm False (inference cfg).
        "minimal": (
            {"architecture": "topk", "d_in": D_IN, "d_sae": N_LAT, "k": K, "dtype": "float32", "metadata": meta},
            {},
        ),
        "no_dtype": ({"architecture": "topk", "d_in": D_IN, "d_sae": N_LAT, "k": K, "metadata": meta}, {}),
        "explicit": (
            {
                "architecture": "topk",
                "d_in": D_IN,
                "d_sae": N_LAT,
                "k": K,
                "dtype": "float32",
                "device": "cpu",
                "apply_b_dec_to_input": True,
                "normalize_activations": "none",
                "reshape_activations": "none",
                "rescale_acts_by_decoder_norm": False,
                "metadata": meta,
            },
            {},
        ),
        "rescale": (
            {
                "architecture": "topk",
                "d_in": D_IN,
                "d_sae": N_LAT,
                "k": K,
                "dtype": "float32",
                "rescale_acts_by_decoder_norm": True,
                "metadata": meta,
            },
            {"rescale": True},
        ),
        "layer_norm": (
            {
                "architecture": "topk",
                "d_in": D_IN,
                "d_sae": N_LAT,
                "k": K,
                "dtype": "float32",
                "normalize_activations": "layer_norm",
                "metadata": meta,
            },
            {"layer_norm": True},
        ),
        "no_b_dec_in": (
            {
                "architecture": "topk",
                "d_in": D_IN,
                "d_sae": N_LAT,
                "k": K,
                "dtype": "float32",
                "apply_b_dec_to_input": False,
                "metadata": meta,
            },
            {"apply_b_dec": False},
        ),
        # No version anywhere -> handle_pre_6_0_config() path (legacy flat keys).
        "legacy_no_version": (
            {
                "architecture": "topk",
                "d_in": D_IN,
                "d_sae": N_LAT,
                "k": K,
                "dtype": "float32",
                "model_name": "gpt2",
                "hook_name": "blocks.6.hook_resid_post",
            },
            {},
        ),
    }
    for name, (cfg, kw) in variants.items():
        folder = root / f"saelens_{name}"
        _write(folder, cfg, tensors, "sae_weights.safetensors")
        try:
            s = SAE.load_from_disk(folder)
        except Exception as e:  # noqa: BLE001
            print(f"[sae_lens/{name}] LOAD FAILED: {type(e).__name__}: {str(e)[:300]}")
            continue
        with torch.no_grad():
            out = s(x)
        err = (out - ref_fn(x, **kw)).abs().max().item()
        print(
            f"[sae_lens/{name}] loaded {type(s).__name__} k={s.cfg.k} "
            f"norm={s.cfg.normalize_activations} rescale={s.cfg.rescale_acts_by_decoder_norm} "
            f"hook={s.cfg.metadata.hook_name}; max|out-ref|={err:.2e}"
        )
        assert err < 1e-4, (name, err)
        print("cfg.json:", json.dumps(cfg))


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="peer_fmt_"))
    print("writing to", root)
    check_sparsify(root)
    check_saelens(root)
    print("OK")
