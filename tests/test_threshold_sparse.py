"""The threshold SAEs' sparse training path (pipeline.sae.threshold) against dense references written out
here with plain autograd (and the straight-through formula for JumpReLU's threshold), and the dense
fallback it switches to above DENSE_SHARE."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from pipeline.fit.config import FitConfig, Training
from pipeline.sae import threshold
from pipeline.sae.archs.relu import ReluSAE
from pipeline.sae.interface import SaeConfig, Step, build_sae

EPS = 0.4  # JumpReLU's bandwidth here
DEAD = [4]  # one dead latent, so the dead-latent loss takes part
SETTINGS = Training.of(FitConfig(sparsity_coeff=0.7, sparsity_warmup=0.0, bandwidth=EPS), k_aux=2, dead_tokens=10**9)
NAMES = ("W_enc", "b_enc", "b_dec", "W_dec", "log_threshold", "r_mag", "b_mag")


def example(arch: str, seed: int = 1) -> tuple[ReluSAE, Tensor]:
    """A tiny SAE (d 4, 6 latents) and 4 tokens: token 3 has no entry at all, the others 1-3 (JumpReLU: token 1's
    latent 2 lies in the window below its threshold)."""
    gen = torch.Generator().manual_seed(seed)
    sae = build_sae(SaeConfig(arch, 4, 6, 2, [0]), gen).train()
    assert isinstance(sae, ReluSAE)
    sae.prepare_training(SETTINGS)
    x = torch.randn(4, 4, generator=gen) * 2
    with torch.no_grad():
        sae.W_dec.mul_(torch.tensor([1.0, 0.5, 2.0, 1.0, 1.5, 0.8])[:, None])  # free rows: norms matter (standard)
        sae.b_dec.copy_(torch.randn(4, generator=gen) * 0.1)
        sae.W_enc.copy_(torch.randn(6, 4, generator=gen) * 0.5)
        x[3] = -2 * sae.W_enc.sum(0)  # pulls every pre-activation of token 3 down
        pre = (x - sae.b_dec) @ sae.W_enc.t()  # (B, N)
        sae.b_enc.copy_(-pre[:3].quantile(0.6, dim=0))  # each latent fires on ~2 of the first 3 tokens
        if arch == "gated":
            sae.r_mag.copy_(torch.randn(6, generator=gen) * 0.3)
            sae.b_mag.copy_(torch.randn(6, generator=gen) * 0.5)
        if arch == "jumprelu":
            theta = torch.full((6,), 0.3)
            pre = pre + sae.b_enc
            theta[2] = pre[1, 2] + EPS / 4  # in the window, below the threshold
            sae.log_threshold.copy_(theta.double().log())
    return sae, x


def reference(sae: ReluSAE, x: Tensor, arch: str) -> dict[str, Tensor]:
    """Every parameter's gradient of MSE + 0.7 x penalty + aux_alpha x dead loss (+ gated's L_aux), by plain
    autograd over dense (B, N) tensors; JumpReLU's threshold by the straight-through formula."""
    params = {n: p.detach().clone().requires_grad_() for n, p in sae.named_parameters()}
    w, b, b_dec, w_dec = params["W_enc"], params["b_enc"], params["b_dec"], params["W_dec"]
    rows = len(x)
    x_sq = x.pow(2).sum(1)
    pre = (x - b_dec) @ w.t() + b  # (B, N)
    norms = w_dec.norm(dim=1) if arch == "standard" else w_dec.norm(dim=1).detach()
    floor = torch.zeros(6)
    if arch == "standard":
        z = pre.relu()
        penalty = ((z * norms).sum(1) / x_sq).mean()
    elif arch == "gated":
        z = (pre > 0) * (params["r_mag"].exp() * (pre - b) + params["b_mag"]).relu()
        penalty = ((pre.relu() * norms).sum(1) / x_sq).mean()
    else:
        theta = params["log_threshold"].exp().float().detach()
        floor = theta
        z = pre * (pre > theta)
        z.retain_grad()
        penalty = torch.zeros(())
    mse = ((x - z @ w_dec - b_dec).pow(2).sum(1) / x_sq).mean()
    dead = (((floor[DEAD] - pre[:, DEAD]).relu() * norms.detach()[DEAD]).sum(1) / x_sq).mean()
    loss = mse + 0.7 * penalty + SETTINGS.aux_alpha * dead
    if arch == "gated":
        frozen = pre.relu() @ w_dec.detach() + b_dec.detach()
        loss = loss + ((x - frozen).pow(2).sum(1) / x_sq).mean()
    loss.backward()
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    if arch != "standard":  # unit decoder rows: the decoder's gradient tangent to them
        grads["W_dec"] = grads["W_dec"] - (grads["W_dec"] * w_dec).sum(1, keepdim=True) * w_dec.detach()
    if arch == "jumprelu":  # dz/dtheta = -(theta / eps) K, dH/dtheta = -K / eps; d/d log theta = theta d/dtheta
        window = ((pre - theta).abs() < EPS / 2).float().detach()  # (B, N) K
        assert z.grad is not None
        d_theta = -(window * (theta * z.grad + 0.7 / (rows * x_sq[:, None]))).sum(0) / EPS  # (N,)
        grads["log_threshold"] = (theta * d_theta).double()
    return grads


def sparse_grads(sae: ReluSAE, x: Tensor, low_precision: bool = False) -> dict[str, Tensor]:
    """The gradients of one training step's loss (MSE + the architecture's weighted terms), as fit forms them."""
    out = sae(x, low_precision=low_precision)
    dead = torch.zeros(6, dtype=torch.bool)
    dead[DEAD] = True
    terms = sae.loss_terms(out, Step(1, 0.5, dead, low_precision, lambda t: t), SETTINGS)
    mse = ((x - out.x_hat).pow(2).sum(1) / x.pow(2).sum(1)).mean()
    sum((t.weight * t.value for t in terms), mse).backward()
    return {n: p.grad.to_dense() for n, p in sae.named_parameters() if p.grad is not None}


def check(got: dict[str, Tensor], want: dict[str, Tensor], low_precision: bool = False) -> None:
    """Every gradient as the reference's. In low precision the weight matrices' are bf16's rounding away (their
    sparse products take bf16 operands, kernels.sparse_t_matmul), and the others see the decode's bf16 rounding
    (kernels.SparseDecode) through the residual: near, not exact."""
    assert set(got) == set(want) and set(got) <= set(NAMES)
    for name in want:
        if low_precision:
            gap = float((got[name] - want[name]).detach().norm() / want[name].detach().norm())
            assert (2**-12 < gap < 2**-7) if name in ("W_enc", "W_dec") else gap < 2**-7, (name, gap)
            continue
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
@pytest.mark.parametrize("low_precision", [False, True])
def test_sparse_path_gradients_equal_the_dense_reference(
    arch: str, low_precision: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threshold, "DENSE_SHARE", 1.0)  # never dense
    sae, x = example(arch)
    want = reference(sae, x, arch)
    got = sparse_grads(sae, x, low_precision)
    code = sae.last_code()
    assert code.pattern is not None  # the flat path ran
    per_token = torch.bincount(code.pattern.tokens, minlength=4)
    assert per_token[3] == 0 and per_token.max() > per_token[:3].min() > 0  # an empty and a shorter row
    if arch == "jumprelu":  # token 1's latent 2 is an entry, in the window, with z = 0
        (at,) = ((code.pattern.tokens == 1) & (code.pattern.latents == 2)).nonzero()[0]
        theta = math.exp(float(sae.log_threshold.detach()[2]))
        assert float(code.acts.detach()[at]) == 0 and float(code.pre.detach()[at]) > theta - EPS / 2
    check(got, want, low_precision)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_dense_fallback_above_the_share_gives_the_same_gradients(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sae, x = example(arch)
    want = reference(sae, x, arch)
    monkeypatch.setattr(threshold, "DENSE_SHARE", 1.0)
    found = threshold.candidates(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.selection_floor(), False)
    assert found is not None
    share = len(found) / (4 * 6)  # this batch's candidate entries over B x N
    monkeypatch.setattr(threshold, "DENSE_SHARE", share * 0.99)  # just below: dense
    check(sparse_grads(sae, x), want)
    assert sae.last_code().pattern is None
    sae.zero_grad(set_to_none=True)
    monkeypatch.setattr(threshold, "DENSE_SHARE", share)  # at it: still sparse
    check(sparse_grads(sae, x), want)
    assert sae.last_code().pattern is not None
