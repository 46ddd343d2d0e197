"""fit --optimizer muon: Muon on the SAE's matrices (orthogonalized steps), Adam on the rest, resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.fit import stage as fit
from pipeline.fit.muon import Muon
from pipeline.fit.optim import make_optimizer
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import SaeConfig
from tests.support.caches import synthetic_cache
from tests.test_fit import interrupted, run_cfg, weights

LR = 0.01


@pytest.mark.parametrize(("low_precision", "off_diagonal"), [(False, 1e-5), (True, 0.03)])
def test_muon_steps_matrices_along_the_orthogonalized_gradient_and_biases_by_adam(
    low_precision: bool, off_diagonal: float
) -> None:
    """One step from rest on a (6, 4) encoder: Nesterov momentum is a multiple of the gradient G, so the
    step is lr x 0.2 sqrt(6) x U S' V^T (G = U S V^T, dense SVD) after decay by lr x 0.1, where five
    Newton-Schulz iterations leave S' within [0.68, 1.14] of 1 (Keller Jordan's coefficients) and the
    singular vectors those of G to the orthogonalization's precision: float32's 1e-5, or bf16's 0.03 where
    the hardware has bf16. A bias takes Adam's first step, lr x sign(g)."""
    sae = TopKSAE(SaeConfig("topk", 4, 6, 2, [0]), torch.Generator().manual_seed(0))
    params = [{"params": list(sae.parameters()), "lr": LR}]
    opt = make_optimizer("muon", params, (0.9, 0.999), torch.device("cpu"), low_precision)
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    grads = {
        name: torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        for i, (name, p) in enumerate(sae.named_parameters())
    }
    for name, p in sae.named_parameters():
        p.grad = grads[name].clone()
    opt.step()

    scale = LR * 0.2 * 6**0.5  # sparsify's and Moonshot's step size for a (6, 4) matrix
    ortho = (before["W_enc"] * (1 - LR * 0.1) - sae.W_enc.detach()) / scale  # (6, 4) the orthogonalized step
    u, s, vh = torch.linalg.svd(grads["W_enc"].double(), full_matrices=False)
    in_basis = u.T @ ortho.double() @ vh.T  # (4, 4) diagonal when U, V are the step's singular vectors
    diagonal = in_basis.diagonal()
    assert diagonal.min() > 0.6 and diagonal.max() < 1.2, diagonal
    assert (in_basis - torch.diag(diagonal)).abs().max() < off_diagonal
    torch.testing.assert_close(
        sae.b_enc.detach(), before["b_enc"] - LR * grads["b_enc"].sign(), atol=1e-6, rtol=0
    )  # Adam's first step: m / sqrt(v) = sign(g)


def test_muon_in_bf16_steps_as_torchs_own_muon() -> None:
    """Muon with bf16 orthogonalization is torch.optim.Muon (Moonshot's step size) bit for bit, over three
    steps of changing gradients on a tall and a wide matrix: momentum, Nesterov, weight decay and the step
    size are torch's; only the precision of the iterations is ours to choose."""
    shapes = [(6, 4), (3, 7)]
    ours = [
        torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(i)))
        for i, shape in enumerate(shapes)
    ]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opts = [
        Muon([{"params": ours}], LR, torch.bfloat16),
        torch.optim.Muon(theirs, lr=LR, adjust_lr_fn="match_rms_adamw"),
    ]
    for step in range(3):
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(10 * step + i))
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=0, rtol=0)


@pytest.fixture()
def cache(tmp_path: Path) -> str:
    return synthetic_cache(tmp_path, [3000, 2500, 2800]).url


def test_muon_fit_runs_and_resumes_to_the_same_weights(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Muon run killed mid-way and resumed from its checkpoint ends with the uninterrupted run's weights
    (both optimizers' states saved and restored), and it trains: FVU falls."""
    (whole,) = fit.run(run_cfg(cache, tmp_path / "a", max_tokens=8192, optimizer="muon", lr=LR)).runs
    interrupted(run_cfg(cache, tmp_path / "b", max_tokens=8192, optimizer="muon", lr=LR), monkeypatch)
    (resumed,) = fit.run(run_cfg(cache, tmp_path / "b", max_tokens=8192, optimizer="muon", lr=LR, resume=True)).runs
    for name, tensor in weights(whole).items():
        torch.testing.assert_close(weights(resumed)[name], tensor, atol=0, rtol=0)
    assert whole.read_json("cfg.json")["training"]["optimizer"] == "muon"
    nmse = np.genfromtxt(f"{whole.url}/log.csv", delimiter=",", names=True)["nmse"]  # 0.54 -> 0.40
    assert nmse[-1] < 0.8 * nmse[0]
