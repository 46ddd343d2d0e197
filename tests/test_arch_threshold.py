"""The threshold SAEs (standard, jumprelu, gated): their losses and straight-through gradients against
hand computations, the automatic sparsity coefficient against its target, and a whole fit -> load ->
evaluate on the synthetic cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig, Training
from pipeline.fit.train import make_member, step_of, train_step
from pipeline.infra.files import Folder
from pipeline.sae.archs.gated import GatedSAE
from pipeline.sae.archs.jumprelu import JumpReluSAE
from pipeline.sae.archs.relu import ReluSAE
from pipeline.sae.folder import load_sae
from pipeline.sae.interface import SaeConfig, Step
from tests.support.caches import synthetic_cache
from tests.test_fit import run_cfg

CPU = torch.device("cpu")


def knobs(**kw: object) -> Training:
    return Training.of(FitConfig(**kw), dead_tokens=10**9, k_aux=4)  # type: ignore[arg-type]


def step(progress: float = 0.5, n: int = 3, dead: list[int] | None = None) -> Step:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[dead or []] = True
    return Step(1, progress, mask, False, lambda t: t)


def test_jumprelu_straight_through_gradients_by_hand() -> None:
    sae = JumpReluSAE(SaeConfig("jumprelu", 2, 2, 1, [0])).train()
    sae.bandwidth = 0.5  # eps: the kernel K((pre - theta) / eps) is 1 where |pre - theta| < 0.25
    with torch.no_grad():
        sae.log_threshold.copy_(torch.tensor([0.0, math.log(2.0)], dtype=torch.float64))  # theta = (1, 2)
    pre = torch.tensor([[1.1, 2.3], [0.9, 1.9], [0.5, 2.2]], requires_grad=True)  # (B=3, N=2)
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    (sae.activate(pre) * w).sum().backward()
    # z = pre * H(pre - theta): above threshold (0,0), (0,1), (2,1); in the window (0,0), (1,0), (1,1), (2,1)
    assert pre.grad is not None
    torch.testing.assert_close(pre.grad, torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 6.0]]))
    # d/d log theta_i = theta_i * sum_b w_bi * -(theta_i / eps) * K_bi
    expected = torch.tensor([1 * -(1 / 0.5) * (1 + 3), 2 * -(2 / 0.5) * (4 + 6)], dtype=torch.float64)
    torch.testing.assert_close(sae.log_threshold.grad, expected)  # (-8, -80)
    # the L0 penalty: mean_b sum_i H_bi / ||x_b||^2 with ||x||^2 = 1; d H / d theta = -(1 / eps) K, none to pre
    sae.log_threshold.grad = None
    pre.grad = None
    sae.pre = pre
    l0 = sae.penalty(None, torch.ones(2), torch.ones(3))  # type: ignore[arg-type]
    assert float(l0.detach()) == pytest.approx(3 / 3)  # three latents fire over three tokens
    l0.backward()
    expected = torch.tensor([1 * -(1 / 0.5) * 2 / 3, 2 * -(1 / 0.5) * 2 / 3], dtype=torch.float64)
    torch.testing.assert_close(sae.log_threshold.grad, expected)
    assert pre.grad is None or not bool(pre.grad.any())


def tiny_standard() -> tuple[ReluSAE, torch.Tensor]:
    sae = ReluSAE(SaeConfig("standard", 2, 3, 1, [0])).train()
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, -2.0]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5], [3.0, 4.0]]))  # row norms 2, 0.5, 5
        sae.b_dec.zero_()
    return sae, torch.tensor([[3.0, 4.0], [1.0, -1.0]])  # ||x||^2 = 25, 2


def test_standard_l1_penalty_and_its_warmup_by_hand() -> None:
    sae, x = tiny_standard()
    out = sae(x)
    # z = ReLU(W_enc x + b_enc): token 1 (3, 3, 5), token 2 (1, 0, 0)
    l1 = ((3 * 2 + 3 * 0.5 + 5 * 5) / 25 + (1 * 2) / 2) / 2  # mean_b sum_i z_bi ||W_dec_i|| / ||x_b||^2
    terms = {t.name: t for t in sae.loss_terms(out, step(0.05), knobs(sparsity_coeff=2.0, sparsity_warmup=0.2))}
    assert float(terms["sparsity_loss"].value.detach()) == pytest.approx(l1)
    assert terms["sparsity_loss"].weight == pytest.approx(2.0 * 0.05 / 0.2)  # linear warm-up over 20 % of the run
    later = {t.name: t for t in sae.loss_terms(out, step(0.5), knobs(sparsity_coeff=2.0, sparsity_warmup=0.2))}
    assert later["sparsity_loss"].weight == pytest.approx(2.0)
    # dead latents: ReLU(0 - pre) x ||W_dec_i|| / ||x||^2; latent 1 is dead, its pre (3, -2)
    assert float(terms["dead_loss"].value.detach()) == 0.0
    dead = {t.name: t for t in sae.loss_terms(out, step(0.5, dead=[1]), knobs(sparsity_coeff=2.0))}
    assert float(dead["dead_loss"].value.detach()) == pytest.approx((0 / 25 + 2 * 0.5 / 2) / 2)


def test_gated_loss_terms_by_hand() -> None:
    sae = GatedSAE(SaeConfig("gated", 2, 2, 1, [0])).train()
    w_enc, b_gate = np.array([[1.0, 2.0], [-1.0, 1.0]]), np.array([-1.0, 0.5])
    r_mag, b_mag = np.array([math.log(2.0), 0.0]), np.array([0.5, -3.0])
    w_dec, b_dec = np.array([[1.0, 1.0], [0.0, 2.0]]), np.array([0.1, -0.1])
    with torch.no_grad():
        for name, value in zip(
            ("W_enc", "b_enc", "r_mag", "b_mag", "W_dec", "b_dec"), (w_enc, b_gate, r_mag, b_mag, w_dec, b_dec)
        ):
            getattr(sae, name).copy_(torch.tensor(value))
    x = np.array([[2.0, 1.0], [0.0, -1.0]])
    centred = x - b_dec
    gate = centred @ w_enc.T + b_gate  # pi_gate
    magnitude = np.exp(r_mag) * (centred @ w_enc.T) + b_mag  # pi_mag: W_mag = exp(r_mag) * W_enc, row-wise
    z = (gate > 0) * np.maximum(magnitude, 0)
    x_sq = (x**2).sum(1)
    norms = np.linalg.norm(w_dec, axis=1)
    l1 = ((np.maximum(gate, 0) * norms).sum(1) / x_sq).mean()
    frozen = np.maximum(gate, 0) @ w_dec + b_dec
    aux = (((x - frozen) ** 2).sum(1) / x_sq).mean()
    out = sae(torch.tensor(x, dtype=torch.float32))
    dense = torch.zeros(2, 2).scatter_add(-1, out.latents.indices, out.latents.acts)
    np.testing.assert_allclose(dense.detach().numpy(), z, rtol=1e-6)
    np.testing.assert_allclose(out.x_hat.detach().numpy(), z @ w_dec + b_dec, rtol=1e-6)
    terms = {t.name: t for t in sae.loss_terms(out, step(n=2), knobs(sparsity_coeff=1.0))}
    assert float(terms["sparsity_loss"].value.detach()) == pytest.approx(l1, rel=1e-6)
    assert float(terms["aux_recon_loss"].value.detach()) == pytest.approx(aux, rel=1e-6)
    assert terms["aux_recon_loss"].weight == 1.0
    terms["aux_recon_loss"].value.backward()  # through a frozen decoder: the gate learns, the decoder not
    assert sae.W_dec.grad is None  # (b_dec centres the encoder's input: that part of it learns)
    assert sae.W_enc.grad is not None and bool(sae.W_enc.grad.any())


def test_gated_penalty_cannot_shrink_decoder_rows(tmp_path: Path) -> None:
    """L_aux reads a frozen decoder, so with free rows nothing holds a row's norm up against the penalty
    sum_i ReLU(pi_gate)_i ||W_dec_i||: rows shrink, the magnitude path makes up for it and the gate's
    pre-activations must grow (on SmolLM2 the mean norm fell to 0.35 and FVU rose). Gated keeps unit rows,
    and the penalty sends them no gradient."""
    settings = knobs(arch="gated", lr=1e-2, schedule="constant", sparsity_coeff=2.0, sparsity_warmup=0.0)
    member = make_member(Folder.at(tmp_path), SaeConfig("gated", 16, 64, 4, [0]), settings, False, [0], CPU)
    data = sparse_rows(64 * 10)
    member.model.start(data[:64], step_of(member, 10))
    for batch in data.split(64):
        train_step(member, batch, 10)
    norms = member.model.W_dec.detach().norm(dim=1)  # (N,)
    torch.testing.assert_close(norms, torch.ones(64), atol=1e-5, rtol=0)
    sae = member.model
    out = sae(data[:64])
    (penalty,) = (t for t in sae.loss_terms(out, step(n=64), settings) if t.name == "sparsity_loss")
    penalty.value.backward()
    assert sae.W_dec.grad is None or not bool(sae.W_dec.grad.any())
    assert sae.W_enc.grad is not None and bool(sae.W_enc.grad.any())  # the gate still pays for firing


def test_gated_unit_rows_outside_training_keep_the_output() -> None:
    """An imported SAELens gated SAE has free decoder rows; finetune's renormalization moves each row's norm
    into the magnitude path (r_mag, b_mag), so the reconstruction is what it was."""
    sae = GatedSAE(SaeConfig("gated", 16, 64, 4, [0]), torch.Generator().manual_seed(0)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1, generator=gen) * 3 + 0.1)  # rows of norm 0.1 .. 3.1
        sae.b_mag.copy_(torch.randn(64, generator=gen))
        sae.r_mag.copy_(torch.randn(64, generator=gen) * 0.3)
    x = sparse_rows(32)
    before = (sae(x).x_hat, sae.W_dec.detach() @ torch.ones(16))  # (B, D), and rows' sums to see they moved
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae(x).x_hat, before[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sae.W_dec.detach() @ torch.ones(16), before[1])


def sparse_rows(n: int, d: int = 16, atoms: int = 48, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Rows that are sums of ``active`` random unit atoms with random positive weights, scaled to
    ||x|| = sqrt(d) as the standardized caches are."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=gen), dim=1)
    picks = torch.rand(n, atoms, generator=gen).argsort(1)[:, :active]  # (n, active)
    rows = (torch.rand(n, active, 1, generator=gen) + 0.5) * dictionary[picks]  # (n, active, d)
    x = rows.sum(1)
    return x / x.norm(dim=1, keepdim=True) * d**0.5


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_automatic_coefficient_brings_l0_to_the_target(arch: str, tmp_path: Path) -> None:
    k = 6  # below the 8 atoms each row is made of: the reconstruction wants more, the penalty must hold it
    settings = knobs(arch=arch, lr=5e-3, schedule="constant", sparsity_coeff=0.0)
    member = make_member(Folder.at(tmp_path), SaeConfig(arch, 16, 64, k, [0]), settings, False, [0], CPU)
    data = sparse_rows(256 * 200, active=8)
    member.model.start(data[:256], step_of(member, 1))
    l0 = [train_step(member, batch, 200)["l0"] for batch in data.split(256)]
    assert abs(np.mean(l0[-20:]) / k - 1) < 0.2, (np.mean(l0[-20:]), member.model.control.u)


def test_jumprelu_coefficient_turns_negative_to_reach_a_target_above_what_reconstruction_wants(tmp_path: Path) -> None:
    """Rows of 2 atoms: the reconstruction is best served by ~2 firing latents, so a target of 8 can only
    be met by rewarding firing (a negative coefficient); a coefficient kept positive leaves L0 below it."""
    k = 8
    settings = knobs(arch="jumprelu", lr=5e-3, schedule="constant", sparsity_coeff=0.0)
    member = make_member(Folder.at(tmp_path), SaeConfig("jumprelu", 16, 64, k, [0]), settings, False, [0], CPU)
    data = sparse_rows(256 * 200, active=2)
    member.model.start(data[:256], step_of(member, 1))
    l0 = [train_step(member, batch, 200)["l0"] for batch in data.split(256)]
    assert abs(np.mean(l0[-20:]) / k - 1) < 0.1, (np.mean(l0[-20:]), member.model.control.u)  # unsigned: 6.8
    assert member.model.coeff_now < 0, member.model.coeff_now


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_fit_trains_loads_and_evaluates_each_threshold_arch(arch: str, tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path, [3000, 2500, 2800], heldout_rows=64).url
    (run,) = fit.run(run_cfg(cache, tmp_path, arch=arch, epochs=2, lr=1e-2)).runs
    header = (Path(run.url) / "log.csv").read_text().splitlines()[0].split(",")
    assert "sparsity_coeff" in header and "sparsity_loss" in header
    sae, cfg = load_sae(run)
    assert isinstance(sae, ReluSAE) and cfg["sae"]["arch"] == arch
    coeff = cfg["result"]["sparsity_coeff"]  # the automatic coefficient's last value: JumpReLU's is signed
    assert coeff != 0 and (arch == "jumprelu" or coeff > 0), coeff
    (metrics,) = evaluate.run(
        EvaluateConfig(runs=[run.url], metrics=["nmse"], device="cpu", cache_root=str(tmp_path))
    ).metrics
    assert 0 < metrics["l0"] < 16 and metrics["fvu"] < 0.9  # k = 4 targeted; 64 true atoms, 3 per row
