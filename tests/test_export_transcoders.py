"""Transcoders export to sparsify's and SAELens's layouts and import back: the files compute, by the libraries'
formulas written out here in numpy, the run's code and MLP-output prediction on the model's own activations
(the sites' scale factors folded in), and `sae-pipe import` reads them back to the same code and prediction.

sparsify 1.3.3 (sparse_coder.py, transcode: true): ``pre = x W^T + b`` (no pre-bias), the k largest of
``relu(pre)``, ``y = z W_dec + b_dec (+ x W_skip^T)``. SAELens 6.x topk with ``apply_b_dec_to_input: false``:
``pre = x W_enc + b_enc``, the k largest of ``relu(pre)``, ``y = z W_dec + b_dec``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.interop.export import export_run
from pipeline.interop.importing import import_checkpoint
from pipeline.sae.archs.transcoder import Transcoder
from pipeline.sae.folder import load_sae, save_weights, write_cfg
from pipeline.sae.interface import SaeConfig

D, N, K, LAYER, C_IN, C_OUT = 64, 128, 4, 1, 2.0, 0.5  # D: the tiny Llama's width


def transcoder_run(root: Path, skip: bool, model: str = "tiny") -> tuple[str, Transcoder]:
    """A run folder of a (skip) transcoder, every parameter random, its MLP sites scaled by C_IN and C_OUT."""
    sae = Transcoder(SaeConfig("transcoder", D, N, K, [LAYER], skip=skip), torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_((0.1 if name == "W_skip" else 0.3) * torch.randn(p.shape, generator=gen))
    folder = Folder.at(str(root / f"run-{skip}"))
    folder.makedirs()
    sites = {s: {"method": "scale", "scales": {str(LAYER): c}} for s, c in (("mlp_in", C_IN), ("mlp_out", C_OUT))}
    cache = {
        "key": "k",
        "model": {"name": model},
        "ctx_len": 8,
        "layers": [LAYER],
        "normalization": {"method": "none"},
    }
    write_cfg(folder, {"status": "complete", "sae": sae.cfg.to_dict(), "cache": {**cache, "site_normalization": sites}})
    save_weights(folder, sae)
    return folder.url, sae.eval()


def their_forward(folder: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exported files' code (B, N) and prediction (B, D) of the MLP's output, by the library's formulas."""
    cfg = json.loads((folder / "cfg.json").read_text())
    sparsify = "transcode" in cfg
    name = "sae.safetensors" if sparsify else "sae_weights.safetensors"
    w = {key: t.double().numpy() for key, t in load_file(str(folder / name)).items()}
    if sparsify:
        assert cfg["transcode"] and cfg["skip_connection"] == ("W_skip" in w)
        pre = x @ w["encoder.weight"].T + w["encoder.bias"]  # (B, N)
    else:
        assert cfg["apply_b_dec_to_input"] is False and cfg["architecture"] == "topk"
        pre = x @ w["W_enc"] + w["b_enc"]  # (B, N)
    code = np.maximum(pre, 0)
    kth = np.sort(code, axis=1)[:, -cfg["k"]][:, None]  # (B, 1)
    code = code * (code >= kth)
    y = code @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if "W_skip" in w else 0)  # (B, D)
    return code, y


def ours(sae: Transcoder, x: torch.Tensor, c_in: float, c_out: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's code (B, N) and prediction (B, D) for the MLP input ``x`` (B, D) as the model has it."""
    with torch.no_grad():
        latents = sae.encode(c_in * x)
        code = torch.zeros(len(x), N).scatter(1, latents.indices, latents.acts)  # (B, N)
        return code, sae.output(c_in * x, latents) / c_out


@pytest.mark.parametrize(("fmt", "skip"), [("sparsify", False), ("sparsify", True), ("saelens", False)])
def test_a_transcoder_exports_as_the_library_computes_it_and_imports_back(
    tmp_path: Path, tiny_llama: Path, fmt: str, skip: bool
) -> None:
    run, sae = transcoder_run(tmp_path, skip, str(tiny_llama))
    folder = Path(export_run(run, fmt, str(tmp_path / "export")).url)
    assert folder.name == ("layers.1.mlp" if fmt == "sparsify" else "export")
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2))  # the MLP's input rows
    code, y = ours(sae, x, C_IN, C_OUT)
    assert 0 < float((code > 0).float().mean()) < 0.5
    their_code, their_y = their_forward(folder, x.double().numpy())
    np.testing.assert_allclose(their_code, code.numpy(), atol=1e-5)
    np.testing.assert_allclose(their_y, y.numpy(), atol=1e-5)
    back = import_checkpoint(str(folder), model=str(tiny_llama), cache_root=str(tmp_path / "cache"))
    imported, cfg = load_sae(back.url)
    assert isinstance(imported, Transcoder) and imported.cfg.layers == [LAYER] and imported.cfg.skip == skip
    back_code, back_y = ours(imported, x, 1.0, 1.0)  # imported: the sites as they are
    torch.testing.assert_close(back_code, code, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back_y, y, atol=1e-5, rtol=1e-5)
    assert cfg["cache"]["site_normalization"] == {"mlp_in": {"method": "none"}, "mlp_out": {"method": "none"}}


def test_saelens_refuses_a_skip_transcoder_and_names_sparsify(tmp_path: Path) -> None:
    run, _ = transcoder_run(tmp_path, skip=True)
    with pytest.raises(UserError, match="SAELens has no TopK skip transcoder.*--format sparsify"):
        export_run(run, "saelens", str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_relu_and_jumprelu_transcoders_import_to_the_code_and_prediction_of_its_formulas(
    tmp_path: Path, tiny_llama: Path, arch: str
) -> None:
    """A folder as SAELens 6.54.12's ``save_model`` writes it (its cfg.json fields), random weights; by its
    formulas: ``pre = x W_enc + b_enc``, ``z = relu(pre)`` (JumpReLU: times ``pre > threshold``),
    ``y = z W_dec + b_dec`` (skip: ``+ x W_skip^T``, W_skip (d_out, d_in))."""
    rng = np.random.default_rng(3)
    w = {"W_enc": rng.normal(0, 0.3, (D, N)), "b_enc": rng.normal(0, 0.3, N), "W_dec": rng.normal(0, 0.3, (N, D))}
    w["b_dec"] = rng.normal(0, 0.3, D)
    w |= {"threshold": rng.uniform(0, 2, N)} if "jumprelu" in arch else {}
    w |= {"W_skip": rng.normal(0, 0.1, (D, D))} if "skip" in arch else {}
    folder = tmp_path / arch
    folder.mkdir()
    save_file({k: torch.from_numpy(v).float() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))
    meta = {
        "sae_lens_version": "6.54.12",
        "model_name": str(tiny_llama),
        "hook_name": f"blocks.{LAYER}.ln2.hook_normalized",
    }
    meta["hook_name_out"] = f"blocks.{LAYER}.hook_mlp_out"
    cfg = {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False}
    cfg |= {"normalize_activations": "none", "reshape_activations": "none", "metadata": meta, "d_out": D}
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": arch}))
    x = rng.normal(0, 1, (64, D))  # the MLP's input rows
    pre = x @ w["W_enc"] + w["b_enc"]  # (B, N)
    code = np.maximum(pre, 0) * (pre > w["threshold"] if "jumprelu" in arch else 1)
    y = code @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if "skip" in arch else 0)  # (B, D)
    assert 0.05 < float((code > 0).mean()) < 0.6  # some latents fire, some do not
    run = import_checkpoint(str(folder), model=str(tiny_llama), cache_root=str(tmp_path / "cache"))
    sae, record = load_sae(run.url)
    assert record["sae"]["arch"] == ("jumprelu_transcoder" if "jumprelu" in arch else "relu_transcoder")
    assert record["sae"].get("skip", False) == ("skip" in arch) and record["sae"]["layers"] == [LAYER]
    rows = torch.from_numpy(x).float()
    with torch.no_grad():
        latents = sae.encode(rows)
        ours_code = torch.zeros(len(x), N).scatter(1, latents.indices, latents.acts)  # (B, N)
        pair = sae(torch.stack([rows, torch.zeros_like(rows)], 1))  # (B, 2, D): what a splice computes
    np.testing.assert_allclose(ours_code.numpy(), code, atol=1e-5)
    np.testing.assert_allclose(pair.x_hat.numpy(), y, atol=1e-4)
    assert record["cache"]["site_normalization"] == {"mlp_in": {"method": "none"}, "mlp_out": {"method": "none"}}
    if arch == "transcoder":  # and back: the same files (the ReLU code has no TopK form for sparsify)
        with pytest.raises(UserError, match="sparsify holds TopK transcoders only"):
            export_run(run.url, "sparsify", str(tmp_path / "to-sparsify"))
    again = Path(export_run(run.url, "saelens", str(tmp_path / "export")).url)
    exported = json.loads((again / "cfg.json").read_text())
    assert {key: exported.get(key) for key in cfg} == {**cfg, "metadata": exported["metadata"]}
    assert exported["architecture"] == arch and exported["metadata"]["hook_name_out"] == meta["hook_name_out"]
    weights = {k: t.double().numpy() for k, t in load_file(str(again / "sae_weights.safetensors")).items()}
    assert sorted(weights) == sorted(w)
    for name, value in w.items():
        np.testing.assert_allclose(weights[name], value, atol=1e-6, err_msg=name)
