"""AuxK's loss and gradients against a straightforward dense reference written out here."""

from __future__ import annotations

import pytest
import torch

from pipeline.sae import auxk_kernels
from pipeline.sae.archs.topk import TopKSAE, auxk_loss
from pipeline.sae.interface import SaeConfig, Step
from pipeline.sae.quality import Reconstruction


def reference_auxk(sae: TopKSAE, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """The top min(k_aux, n_dead - 1) ReLU'd dead latents decode the residual; its squared error over the
    residual's squared spread about its mean."""
    ids = dead.nonzero().squeeze(1)
    pre = (x - sae.b_dec.detach()) @ sae.W_enc[ids].T + sae.b_enc[ids]  # (B, n_dead)
    top = pre.topk(min(k_aux, len(ids) - 1), dim=1)
    code = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    residual = x - x_hat
    return ((code @ sae.W_dec[ids] - residual) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()


def grads(sae: TopKSAE, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [sae.W_enc, sae.b_enc, sae.W_dec]))


@pytest.mark.parametrize(
    ("k_aux", "topk_decides"),
    [(40, False), (6, True), (2, None)],  # every positive kept; the top k cuts some; > DENSE_AUX x k: sparse kernels
)
def test_auxk_equals_a_dense_reference(k_aux: int, topk_decides: bool | None) -> None:
    """Loss and gradients (the main loss's and AuxK's together, as a training step sums them) equal the
    reference, the decoder's AuxK gradient tangent to its unit rows; the gradients come out dense."""
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig("topk", 16, 64, 4, [0]), torch.Generator().manual_seed(1))
    sae.tangent_decoder_grad = True  # unit decoder rows, as training keeps them (prepare_training)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:30]] = True
    with torch.no_grad():
        sae.b_enc[dead] = torch.randn(30) * 0.3 - 0.2  # dead latents: some tokens positive, most not
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(40, 16)
    out = sae(x)
    positive = ((x - sae.b_dec) @ sae.W_enc[dead].T + sae.b_enc[dead] > 0).sum(1).max()
    if topk_decides is not None:  # the case each parameter set is meant to reach
        assert bool(positive > k_aux) == topk_decides and 30 <= auxk_kernels.DENSE_AUX * k_aux
    main = Reconstruction().add(out.x, out.x_hat)
    fast = auxk_loss(sae, out, Step(0, 0.0, dead, False, lambda t: t), k_aux)
    expected = reference_auxk(sae, x, out.x_hat.detach(), dead, k_aux)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=0)
    got = [g.detach() for g in torch.autograd.grad(main + fast, [sae.W_enc, sae.b_enc, sae.W_dec], retain_graph=True)]
    assert all(g.layout == torch.strided for g in got)
    main_grads, aux_grads = grads(sae, main), grads(sae, expected)
    rows = sae.W_dec.detach()
    aux_grads[2] -= (aux_grads[2] * rows).sum(1, keepdim=True) * rows  # AuxK keeps decoder rows on the sphere
    for g, m, a in zip(got, main_grads, aux_grads):
        torch.testing.assert_close(g, m + a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dense_up_to", [0, 1000])  # 0: the sparse kernels; 1000: the dense GEMMs
def test_low_precision_auxk_rounds_its_products_to_bf16(dense_up_to: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """In low precision AuxK's decode and weight gradients come from bf16 operands, either form: within bf16's
    rounding of the float32 ones, and not equal to them. Every pre-activation is positive and k = n, so nothing
    is chosen: rounding that tipped a near-tie (or a near-zero) would swap whole terms, not round them."""
    monkeypatch.setattr(auxk_kernels, "DENSE_AUX", dense_up_to)
    gen = torch.Generator().manual_seed(5)
    x, target = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    w_dec = torch.nn.functional.normalize(torch.randn(40, 32, generator=gen), dim=1)
    leaves = [torch.randn(40, 32, generator=gen) / 6, torch.full((40,), 5.0), w_dec]
    results = []
    for low_precision in (False, True):
        w_enc, b_enc, w_dec = (p.clone().requires_grad_() for p in leaves)
        guess = auxk_kernels.aux_decode(x, w_enc, b_enc, torch.zeros(32), w_dec, 40, low_precision, tangent=True)
        (guess - target).pow(2).sum().backward()
        results.append([guess.detach(), w_enc.grad, w_dec.grad])
        assert float((x @ leaves[0].T).min()) > -5  # every pre-activation positive
    for name, exact, low in zip(("decode", "W_enc", "W_dec"), *results):
        gap = float((low - exact).norm() / exact.norm())
        assert 2**-12 < gap < 2**-6, (name, gap)
