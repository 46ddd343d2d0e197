"""fit --optimizer muon: Muon on the SAE's matrices (orthogonalized steps), Adam on the rest, resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.fit import stage as fit
from pipeline.fit.optim import make_optimizer
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import SaeConfig
from tests.support.caches import synthetic_cache
from tests.test_fit import interrupted, run_cfg, weights

LR = 0.01


def test_muon_steps_matrices_along_the_orthogonalized_gradient_and_biases_by_adam() -> None:
    """One step from rest on a (6, 4) encoder: Nesterov momentum is a multiple of the gradient G, so the
    step is lr x 0.2 sqrt(6) x U S' V^T (G = U S V^T, dense SVD) after decay by lr x 0.1, where five
    Newton-Schulz iterations leave S' within [0.68, 1.14] of 1 (Keller Jordan's coefficients) and the
    singular vectors those of G to bf16 precision. A bias takes Adam's first step, lr x sign(g)."""
    sae = TopKSAE(SaeConfig("topk", 4, 6, 2, [0]), torch.Generator().manual_seed(0))
    opt = make_optimizer("muon", [{"params": list(sae.parameters()), "lr": LR}], (0.9, 0.999), torch.device("cpu"))
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
    assert (in_basis - torch.diag(diagonal)).abs().max() < 0.03
    torch.testing.assert_close(
        sae.b_enc.detach(), before["b_enc"] - LR * grads["b_enc"].sign(), atol=1e-6, rtol=0
    )  # Adam's first step: m / sqrt(v) = sign(g)


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
