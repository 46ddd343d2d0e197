"""Every architecture exports to SAELens's layout: the files compute, by SAELens's inference formulas written out
here, the run's code and reconstruction, and `sae-pipe import` reads them back to the same code.

SAELens names (sae_lens 6.x, sae_lens/saes/*.py): standard ``relu(pre)``; topk: the k largest of ``relu(pre)``;
jumprelu ``relu(pre) * (pre > threshold)``; gated ``(x W_enc + b_gate > 0) * relu(x (W_enc exp(r_mag)) + b_mag)``,
all with ``pre = (x - b_dec) W_enc + b_enc`` and ``x_hat = z W_dec + b_dec``. BatchTopK and Matryoshka are saved as
jumprelu with the one batch threshold for every latent (batchtopk_sae.py, process_state_dict_for_saving_inference).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.interop.export import export_run
from pipeline.interop.importing import read_checkpoint
from pipeline.sae.archs.relu import ReluSAE
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.folder import save_weights, write_cfg
from pipeline.sae.interface import REGISTRY, Latents, SaeConfig, build_sae, pack

D, N, K, LAYER, SCALE = 12, 48, 4, 1, 2.0
# ours -> the architecture SAELens loads it as, written out from SAELens's registry (sae_lens/__init__.py)
SAELENS_NAME = {
    "topk": "topk",
    "standard": "standard",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
}


class BatchTopKShape(TopKSAE):
    """The documented inference shape of BatchTopK (one scalar ``threshold`` buffer), standing in for
    pipeline/sae/archs/batchtopk.py where it is not registered yet."""

    top_k = False

    def __init__(self, cfg: SaeConfig, generator: torch.Generator | None = None, device: str = "cpu") -> None:
        super().__init__(cfg, generator, device)
        self.register_buffer("threshold", torch.zeros((), device=device))

    def dense_code(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t())  # (B, N)
        return pre.relu() * (pre > self.threshold)

    def encode(
        self, x: torch.Tensor, k: int | None = None, theta: float | None = None, low_precision: bool = False
    ) -> Latents:
        return pack(self.dense_code(x), k, theta)


STAND_INS = {"batchtopk": BatchTopKShape, "matryoshka": BatchTopKShape, "standard": ReluSAE}


def run_folder(root: Path, arch: str, method: str) -> tuple[str, torch.nn.Module]:
    """A run folder of ``arch`` with every parameter random (biases, thresholds, gates) on the scale of x."""
    cfg = SaeConfig(arch, D, N, K, [LAYER], prefixes=[N // 4, N // 2, N] if arch == "matryoshka" else [])
    sae = build_sae(cfg, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    state = sae.state_dict()  # set through load_state_dict: a class may store `threshold` as its log
    for name, tensor in state.items():
        if "threshold" in name:  # inside the spread of pre, so that it decides some latents
            state[name] = 0.05 + 0.3 * torch.rand(tensor.shape, generator=gen)
        elif "W_" not in name:
            state[name] = 0.3 * torch.randn(tensor.shape, generator=gen)
    sae.load_state_dict(state)
    folder = Folder.at(str(root / arch / method))
    folder.makedirs()
    norm = {"method": method, "eps": 1e-6, "scales": {str(LAYER): SCALE} if method == "scale" else {}}
    cache = {"key": "test-cache", "model": {"name": "tiny"}, "ctx_len": 8, "layers": [LAYER], "normalization": norm}
    write_cfg(folder, {"status": "complete", "sae": cfg.to_dict(), "cache": cache})
    save_weights(folder, sae)
    return folder.url, sae.eval()


def saelens_forward(folder: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens's inference encode and decode of the exported files, in numpy from its formulas."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {name: t.double().numpy() for name, t in load_file(str(folder / "sae_weights.safetensors")).items()}
    assert cfg["apply_b_dec_to_input"] and cfg["normalize_activations"] == "none"
    sae_in = x - w["b_dec"]  # (B, D)
    if cfg["architecture"] == "gated":
        gate = sae_in @ w["W_enc"] + w["b_gate"] > 0  # (B, N)
        code = gate * np.maximum(sae_in @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
    else:
        pre = sae_in @ w["W_enc"] + w["b_enc"]  # (B, N)
        code = np.maximum(pre, 0)
        if cfg["architecture"] == "jumprelu":
            code = code * (pre > w["threshold"])
        if cfg["architecture"] == "topk":
            kth = np.sort(code, axis=1)[:, -cfg["k"]][:, None]  # (B, 1)
            code = code * (code >= kth)
    return code, code @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("method", ["none", "scale"])
@pytest.mark.parametrize("arch", sorted(SAELENS_NAME))
def test_every_arch_exports_as_saelens_computes_it_and_imports_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, method: str
) -> None:
    if arch not in REGISTRY:
        monkeypatch.setitem(REGISTRY, arch, STAND_INS[arch])
    run, sae = run_folder(tmp_path, arch, method)
    folder = Path(export_run(run, "saelens", str(tmp_path / "export")).url)
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == SAELENS_NAME[arch]
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2))  # the model's activations
    c = SCALE if method == "scale" else 1.0  # the run reads c x; the export takes x itself
    with torch.no_grad():
        code = sae.dense_code(c * x)  # (B, N)
        out = sae.decode(pack(code)) / c  # (B, D)
    assert 0 < float((code > 0).float().mean()) < 0.5  # some latents fire, most do not
    their_code, their_out = saelens_forward(folder, x.double().numpy())
    np.testing.assert_allclose(their_code, code.numpy(), atol=1e-5)
    np.testing.assert_allclose(their_out, out.numpy(), atol=1e-5)
    imported = read_checkpoint(folder).module()
    with torch.no_grad():
        torch.testing.assert_close(imported.dense_code(x), code, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_sparsify_refuses_what_it_cannot_hold_and_names_the_format_that_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    if arch not in REGISTRY:
        monkeypatch.setitem(REGISTRY, arch, STAND_INS.get(arch, ReluSAE))
    run, _ = run_folder(tmp_path, arch, "none")
    with pytest.raises(UserError, match=f"sparsify holds TopK SAEs only; export this {arch} SAE with --format saelens"):
        export_run(run, "sparsify", str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()
