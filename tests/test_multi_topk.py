"""Multi-TopK training from one selection: both codes, their losses and gradients against two dense top-ks
written out here, one encoder GEMM a step, alone and in a sweep's shared selection, and inference untouched."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pipeline.fit.config import FitConfig, Training
from pipeline.sae import selection
from pipeline.sae.archs import batchtopk
from pipeline.sae.archs.batchtopk import BatchTopKSAE
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import SaeConfig, Step
from pipeline.sae.quality import Reconstruction

D, N, K, B = 8, 64, 4, 32
KNOBS = Training.of(FitConfig(multi_topk=True), lr=1e-3, k_aux=4, dead_tokens=1)
NO_DEAD = Step(0, 0.0, torch.zeros(N, dtype=torch.bool), False, lambda t: t)  # no AuxK: nothing is dead


def tiny(n: int = N, k: int = K, seed: int = 0, arch: type[TopKSAE] = TopKSAE) -> TopKSAE:
    """A float32 TopK (or BatchTopK) SAE prepared for multi-TopK training, its biases and decoder random (not the
    tied init)."""
    sae = arch(SaeConfig("topk", D, n, k, [0]), torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(n, generator=gen))
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=gen))
        sae.W_dec.copy_(torch.randn(n, D, generator=gen))
        sae.normalize_decoder()
    sae.prepare_training(KNOBS)
    return sae.train()


def batch(seed: int = 2) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (((x - x_hat) ** 2).sum(1) / (x**2).sum(1)).mean()


def token_top(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The dense code (B, N) keeping each row's k largest of ``pre``."""
    top = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, top.indices, top.values)


def batch_top(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The dense code (B, N) keeping the k x B largest of ``pre`` over the whole batch."""
    top = pre.flatten().topk(k * len(pre))
    return torch.zeros_like(pre).flatten().scatter(0, top.indices, top.values).reshape(pre.shape)


def reference(
    sae: TopKSAE, x: torch.Tensor, top: Callable[[torch.Tensor, int], torch.Tensor] = token_top
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """sparsify's multi-TopK by hand: dense ReLU'd pre-activations, their ``top`` k and top 4k, two decodes, loss
    nmse(k) + nmse(4k) / 8; the decoder's gradient made tangent to its unit rows, as training keeps them."""
    params = [p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    w_enc, b_enc, w_dec, b_dec = params
    pre = ((x - b_dec) @ w_enc.T + b_enc).relu()  # (B, N)

    def reconstruction(k: int) -> torch.Tensor:
        return top(pre, k) @ w_dec + b_dec  # (B, D)

    main, wide = nmse(x, reconstruction(sae.cfg.k)), nmse(x, reconstruction(4 * sae.cfg.k))
    g_enc, g_b_enc, g_dec, g_b_dec = torch.autograd.grad(main + wide / 8, params)
    tangent = g_dec - (g_dec * w_dec.detach()).sum(1, keepdim=True) * w_dec.detach()  # (N, D)
    return {"nmse": float(main.detach()), "multi_topk_loss": float(wide.detach())}, [g_enc, g_b_enc, tangent, g_b_dec]


def train_grads(sae: TopKSAE, x: torch.Tensor, chosen: torch.Tensor | None = None) -> dict[str, float]:
    """One training step's loss, as fit's train_step forms it, backpropagated; returns its terms."""
    out = sae(x) if chosen is None else sae(x, chosen=chosen)
    main = Reconstruction().add(out.x, out.x_hat)
    terms = sae.loss_terms(out, NO_DEAD, KNOBS)
    assert [(t.name, t.weight) for t in terms] == [("aux_loss", KNOBS.aux_alpha), ("multi_topk_loss", 1 / 8)]
    sum((t.weight * t.value for t in terms), main).backward()
    return {"nmse": float(main.detach()), **{t.name: float(t.value.detach()) for t in terms[1:]}}


def sweep_encoder(sae: TopKSAE) -> selection.Encoder:
    """What the sae gives a sweep's shared selection (fit's shared_selection)."""
    encoder = sae.shared_encoder()
    assert encoder is not None
    return encoder


@pytest.fixture
def gemms(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of latents of every encoder GEMM run (selection.encoder_preacts, what select_topk calls), one entry each."""
    calls: list[int] = []
    gemm = selection.encoder_preacts

    def counted(x: torch.Tensor, encoders: list[selection.Encoder], low_precision: bool) -> torch.Tensor:
        calls.append(sum(e.w_enc.shape[0] for e in encoders))
        return gemm(x, encoders, low_precision)

    monkeypatch.setattr(selection, "encoder_preacts", counted)
    monkeypatch.setattr(batchtopk, "encoder_preacts", counted)  # imported by name there
    return calls


@pytest.mark.parametrize("shared", [False, True])
def test_one_selection_trains_as_two_dense_top_ks_with_one_gemm(shared: bool, gemms: list[int]) -> None:
    """Loss terms and every parameter's gradient equal the reference, and the step runs one encoder GEMM: its
    own, or (shared) the sweep's, where a multi-TopK member asks for its 4k latents next to a plain member."""
    sae, other, x = tiny(), tiny(n=32, k=2, seed=5), batch()
    other.prepare_training(Training.of(FitConfig(), lr=1e-3, k_aux=4, dead_tokens=1))  # a plain TopK member
    chosen = None
    if shared:  # what fit's shared_selection does for two members reading one layer
        chosen, plain = selection.select_topk(x, [sweep_encoder(sae), sweep_encoder(other)], False)
        assert (chosen.indices.shape, plain.indices.shape) == ((B, 4 * K), (B, 2))
    terms = train_grads(sae, x, chosen)
    assert gemms == ([N + 32] if shared else [N])  # one GEMM a step, no second one at 4k
    want_terms, want_grads = reference(sae, x)
    assert terms == pytest.approx(want_terms, abs=1e-5)
    for name, got, want in zip(("W_enc", "b_enc", "W_dec", "b_dec"), sae.parameters(), want_grads):
        assert got.grad is not None
        torch.testing.assert_close(got.grad, want, atol=1e-5, rtol=0, msg=f"{name}'s gradient")


def test_batchtopk_trains_both_batch_top_ks_from_one_selection(gemms: list[int]) -> None:
    """BatchTopK's multi-TopK step: the k x B and 4k x B largest over the batch, loss terms and gradients as two
    dense batch top-ks give them, from one encoder GEMM (was: a second batch top-k at 4k)."""
    sae, x = tiny(arch=BatchTopKSAE), batch()
    terms = train_grads(sae, x)
    assert gemms == [N]
    assert sae.kept is not None and sae.kept.wide is None  # the kept 4k code was consumed by loss_terms
    want_terms, want_grads = reference(sae, x, batch_top)
    assert terms == pytest.approx(want_terms, abs=1e-5)
    for name, got, want in zip(("W_enc", "b_enc", "W_dec", "b_dec"), sae.parameters(), want_grads):
        assert got.grad is not None
        torch.testing.assert_close(got.grad, want, atol=1e-5, rtol=0, msg=f"{name}'s gradient")


def test_inference_and_other_k_take_the_plain_top_k() -> None:
    """Outside a training step's own code (eval mode, another k) the code is the plain top k of the pre-activations,
    multi-TopK or not, and nothing is kept for a loss."""
    sae, x = tiny(), batch()
    pre = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).relu().detach()  # (B, N)

    def dense(latents: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.zeros(B, N).scatter(1, latents[1], latents[0].detach())

    def top(k: int) -> torch.Tensor:
        values, ids = pre.topk(k, dim=1)
        return torch.zeros(B, N).scatter(1, ids, values)

    torch.testing.assert_close(dense(sae(x, k=2 * K).latents), top(2 * K), atol=1e-6, rtol=0)  # training, k given
    assert sae.wide is None
    sae.eval()
    torch.testing.assert_close(dense(sae(x).latents), top(K), atol=1e-6, rtol=0)
    torch.testing.assert_close(dense(sae.encode(x)), top(K), atol=1e-6, rtol=0)
    assert sae.wide is None and sweep_encoder(sae).k == K


def test_a_skip_transcoder_trains_multi_topk_on_its_output_with_its_skip_path() -> None:
    """A skip transcoder's multi-TopK loss is the normalized MSE of its MLP-output prediction from the input's code
    at 4k plus the skip path, one selection a step (was: a crash, the forward handed the output for a pair)."""
    from pipeline.sae.archs.transcoder import Transcoder

    model = Transcoder(SaeConfig("transcoder", D, N, K, [0], skip=True), torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        model.normalize_decoder()
    model.prepare_training(KNOBS)
    model.train()
    pair = torch.randn(B, 2, D, generator=gen)  # (B, 2, D): the MLP's input and output
    x_in, y = pair[:, 0], pair[:, 1]
    terms = train_grads(model, pair)
    pre = (x_in @ model.W_enc.detach().T + model.b_enc.detach()).relu()  # (B, N)
    assert model.W_skip is not None
    skip = x_in @ model.W_skip.detach().T  # (B, D)

    def predicted(k: int) -> torch.Tensor:
        top = pre.topk(k, dim=1)
        code = torch.zeros_like(pre).scatter(1, top.indices, top.values)  # (B, N)
        return code @ model.W_dec.detach() + model.b_dec.detach() + skip

    assert terms["nmse"] == pytest.approx(float(nmse(y, predicted(K))), rel=1e-5)
    assert terms["multi_topk_loss"] == pytest.approx(float(nmse(y, predicted(4 * K))), rel=1e-5)
    assert model.W_skip.grad is not None and bool(model.W_skip.grad.abs().sum() > 0)  # the skip path trains
