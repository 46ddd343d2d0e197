"""The SAE modules: TopK and RouteSAE forward, their fused kernels' gradients, and the quality sums."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from pipeline.fit.config import FitConfig, Training
from pipeline.sae import auxk_kernels, kernels, selection, threshold
from pipeline.sae.archs import batchtopk
from pipeline.sae.archs.route import RouteSAE
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import REGISTRY, SaeConfig, Step

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("routing", ["hard", "soft"])
@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_routesae_shapes_and_gradients(routing: str, aggregate: str) -> None:
    torch.manual_seed(0)
    model = RouteSAE(SaeConfig("route", 16, 64, 4, [2, 3, 4], routing, aggregate))
    xs = torch.randn(10, 3, 16)
    out = model(xs)
    assert out.x.shape == out.x_hat.shape == (10, 16)
    assert out.layer_weights.shape == (10, 3) and torch.allclose(out.layer_weights.sum(-1), torch.ones(10))
    assert (out.layer_choice is None) == (routing == "soft")
    if routing == "hard":
        rows = torch.arange(10)
        expected = xs[rows, out.layer_choice] * out.layer_weights[rows, out.layer_choice][:, None]
        torch.testing.assert_close(out.x, expected)
    ((out.x_hat - out.x) ** 2).sum().backward()
    assert model.router.weight.grad is not None and model.router.weight.grad.abs().sum() > 0
    assert model.sae.W_enc.grad is not None and model.sae.W_dec.grad is not None


def test_topk_gradients_match_a_dense_reference() -> None:
    torch.manual_seed(0)
    model = TopKSAE(SaeConfig("topk", 16, 64, 4, [0])).double()
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_()
    x = torch.randn(20, 16, dtype=torch.double)
    ((model(x).x_hat - x) ** 2).sum().backward()
    sparse = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    pre = torch.relu((x - model.b_dec) @ model.W_enc.T + model.b_enc)
    vals, idx = pre.topk(4)
    x_hat = torch.zeros_like(pre).scatter(1, idx, vals) @ model.W_dec + model.b_dec
    ((x_hat - x) ** 2).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(sparse[name], param.grad, msg=name)


def test_tangent_decoder_gradient_drops_the_radial_component() -> None:
    torch.manual_seed(1)
    model = TopKSAE(SaeConfig("topk", 16, 64, 4, [0]))
    x = torch.randn(20, 16)
    ((model(x).x_hat - x) ** 2).sum().backward()
    full = model.W_dec.grad.clone()
    model.zero_grad()
    model.tangent_decoder_grad = True
    ((model(x).x_hat - x) ** 2).sum().backward()
    radial = (full * model.W_dec).sum(1, keepdim=True) * model.W_dec  # rows have unit norm
    torch.testing.assert_close(model.W_dec.grad, full - radial)
    assert (model.W_dec.grad * model.W_dec).sum(1).abs().max() < 1e-5


def test_topk_input_gradient_matches_a_dense_reference() -> None:
    """The router learns only through the SAE's input gradient, so the fused kernel must get it right."""
    torch.manual_seed(2)
    model = TopKSAE(SaeConfig("topk", 16, 64, 4, [0])).double()
    with torch.no_grad():
        model.b_dec.normal_()
    x = torch.randn(20, 16, dtype=torch.double, requires_grad=True)
    ((model(x).x_hat - x.detach()) ** 2).sum().backward()
    fused = x.grad.clone()
    x.grad = None
    pre = torch.relu((x - model.b_dec) @ model.W_enc.T + model.b_enc)
    vals, idx = pre.topk(4)
    x_hat = torch.zeros_like(pre).scatter(1, idx, vals) @ model.W_dec + model.b_dec
    ((x_hat - x.detach()) ** 2).sum().backward()
    assert fused.abs().sum() > 0
    torch.testing.assert_close(fused, x.grad)


def test_hard_routing_follows_a_hand_computed_router() -> None:
    """Expected routing from the router weights by hand (numpy), not from the model's own outputs."""
    import numpy as np

    torch.manual_seed(3)
    model = RouteSAE(SaeConfig("route", 8, 32, 2, [1, 2, 3], "hard", "sum"))
    xs = torch.randn(50, 3, 8)
    w = model.router.weight.detach().numpy().astype(np.float64)  # (L, D)
    logits = xs.sum(1).numpy().astype(np.float64) @ w.T  # (B, L)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    choice = probs.argmax(1)
    expected = xs.numpy()[np.arange(50), choice] * probs[np.arange(50), choice][:, None]
    out = model(xs)
    np.testing.assert_array_equal(out.layer_choice.numpy(), choice)
    np.testing.assert_allclose(out.x.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_threshold_and_infer_k_encodes_match_dense() -> None:
    torch.manual_seed(4)
    model = TopKSAE(SaeConfig("topk", 16, 64, 8, [0]))
    with torch.no_grad():
        model.b_enc.normal_()
    x = torch.randn(30, 16)
    pre = torch.relu((x - model.b_dec) @ model.W_enc.T + model.b_enc)  # (B, N) dense reference
    for k in (1, 3):
        dense = torch.zeros_like(pre).scatter(1, pre.topk(k).indices, pre.topk(k).values)
        code = model.encode(x, k=k)
        got = torch.zeros_like(pre).scatter(1, code.indices, code.acts)
        torch.testing.assert_close(got, dense)
    theta = float(pre.detach().quantile(0.9))
    code = model.encode(x, theta=theta)
    got = torch.zeros_like(pre).scatter_add(1, code.indices, code.acts)
    torch.testing.assert_close(got, pre * (pre > theta))


def test_quality_sums_over_batches_equal_one_pass() -> None:
    import numpy as np

    from pipeline.sae.quality import Reconstruction

    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 12)) + 3.0  # an offset, so fvu and nmse differ
    x_hat = x + 0.3 * rng.standard_normal((90, 12))
    sums = Reconstruction()
    for part in np.array_split(np.arange(90), 4):
        sums.add(torch.from_numpy(x[part]), torch.from_numpy(x_hat[part]))
    err = ((x - x_hat) ** 2).sum(1)
    assert sums.nmse == pytest.approx(float(np.mean(err / (x**2).sum(1))), rel=1e-9)
    assert sums.fvu == pytest.approx(float(err.sum() / ((x - x.mean(0)) ** 2).sum()), rel=1e-9)


def test_training_loss_gradient_equals_the_written_out_nmse() -> None:
    """Reconstruction.add's loss (its one-pass squared error) has torch's gradient of the NMSE written out, in
    x_hat and in x (a RouteSAE's input depends on its router)."""
    from pipeline.sae.quality import Reconstruction

    gen = torch.Generator().manual_seed(0)
    x, x_hat = (torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weights = torch.rand(6, 5, generator=gen, dtype=torch.float64)  # a loss downstream that is not symmetric
    ours = torch.autograd.grad(Reconstruction().add(x, x_hat * weights), (x, x_hat))
    written = ((x - x_hat * weights).pow(2).sum(1) / x.pow(2).sum(1)).mean()
    for got, want in zip(ours, torch.autograd.grad(written, (x, x_hat))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_shared_selection_equals_each_sae_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """One GEMM over several encoders (and split when over FUSE_COLUMNS) picks each SAE's own top k, and gives
    its own pre-activations there (every b_dec but the first folded into its bias)."""
    torch.manual_seed(0)
    x = torch.randn(64, 16) + 3  # an offset input: the pre-bias term matters
    saes = [TopKSAE(SaeConfig("topk", 16, n, k, [0])) for n, k in ((512, 4), (256, 8), (512, 2))]
    for sae in saes:
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_()
    monkeypatch.setattr(selection, "FUSE_COLUMNS", 800)  # the first two share a GEMM, the third runs alone
    chosen = selection.select_topk(x, [sae.encoder() for sae in saes], low_precision=False)
    for sae, found in zip(saes, chosen):
        dense = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc.t())  # (B, N) the reference pre-activations
        expected = dense.topk(sae.cfg.k).indices.sort(dim=1).values
        assert torch.equal(found.indices.sort(dim=1).values, expected)
        torch.testing.assert_close(found.pre, dense.gather(1, found.indices), rtol=1e-5, atol=1e-5)


def test_low_precision_selection_values_are_rounded_from_the_centered_input() -> None:
    """The bf16 selection's values (what TopKEncode returns) are within bf16's rounding of the exact
    pre-activations, on inputs whose mean is 30x their spread: the GEMM rounds x - b_dec, not x (rounding x
    would leave errors of 2^-9 |W x|, some 30x the value)."""
    gen = torch.Generator().manual_seed(3)
    sae = TopKSAE(SaeConfig("topk", 64, 256, 8, [0]), gen)
    mean = torch.randn(64, generator=gen) * 30
    x = mean + torch.randn(200, 64, generator=gen)  # (B, D)
    with torch.no_grad():
        sae.b_dec.copy_(mean)
        sae.b_enc.normal_(generator=gen)
    (found,) = selection.select_topk(x, [sae.encoder()], low_precision=True)
    exact = torch.addmm(sae.b_enc.double(), (x - sae.b_dec).double(), sae.W_enc.double().t()).detach()  # (B, N)
    want = exact.gather(1, found.indices)  # (B, k)
    assert found.pre.dtype == torch.bfloat16
    assert float(((found.pre.double() - want).abs() / want.abs()).median()) < 2**-7


@pytest.mark.parametrize("low_precision", [False, True])
def test_cuda_gemm_pads_its_inner_size_with_zeros_whatever_the_buffers_held(
    low_precision: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA form of the selection GEMM (run here on CPU) pads d + 2 = 22 to 24 columns of zeros and gives the
    CPU form's pre-activations, though its reused buffers held NaN from before (two encoders: sizes of a sweep)."""
    torch.manual_seed(1)
    x = torch.randn(40, 20) + 2
    encoders = [TopKSAE(SaeConfig("topk", 20, n, 4, [0])).encoder() for n in (96, 32)]
    dtype = torch.bfloat16 if low_precision else torch.float32
    monkeypatch.setattr(selection, "_WORKSPACE", {})
    for name in ("w_aug", "x_aug"):  # stale contents where the padding goes
        selection._WORKSPACE[(name, dtype, x.device)] = torch.full((200 * 24,), float("nan"), dtype=dtype)
    inner = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: (inner.append(a.shape[1]), real_mm(a, b, **kw))[1])
    padded = selection.encoder_preacts(x, encoders, low_precision, cpu_tuned=False).clone()  # (B, 128)
    plain = selection.encoder_preacts(x, encoders, low_precision, cpu_tuned=True)
    assert inner == [24, 22]
    tolerance = 2e-2 if low_precision else 1e-5
    torch.testing.assert_close(padded.float(), plain.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [16384, 300])  # three levels of recursion at k 32; one plain top-k
def test_cuda_topk_branch_equals_the_cpu_tuned_one(dtype: torch.dtype, width: int) -> None:
    """The plain torch.topk branch CUDA takes, run here on CPU, picks what the two-stage CPU path picks, and
    both give each pick's own value (the CPU path reads them back from its integer keys), negatives included."""
    from pipeline.sae.selection import top_k

    torch.manual_seed(0)
    pre = torch.randn(64, width) * torch.rand(64, 1) + torch.randn(width) * 0.3  # (B, N), rows of varying spread
    pre[:8] = -pre[:8].abs() - 1  # rows whose top k are all negative: their keys are mirrored
    pre = pre.to(dtype)
    want = pre.topk(32)
    for cpu_tuned in (True, False):
        values, indices = top_k(pre, 32, cpu_tuned=cpu_tuned)
        assert values.dtype == dtype and torch.equal(values, pre.gather(1, indices))
        assert torch.equal(values.sort(dim=1).values, want.values.sort(dim=1).values)
        if dtype == torch.float32:  # no ties: the same latents too (bf16 ties may swap equal values)
            assert torch.equal(indices.sort(dim=1).values, want.indices.sort(dim=1).values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_from_ordered_bits_undoes_ordered_bits(dtype: torch.dtype) -> None:
    """Every float's key turns back into the same bits: signs, zeros of both signs, infinities, tiny values."""
    from pipeline.sae.selection import from_ordered_bits, ordered_bits

    gen = torch.Generator().manual_seed(5)
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-30, -1e-30, -1.0, 3.5])
    values = torch.cat([torch.randn(200, generator=gen) * 1e3, edges]).to(dtype)
    back = from_ordered_bits(ordered_bits(values), dtype)
    assert torch.equal(back.view(ordered_bits(values).dtype), values.view(ordered_bits(values).dtype))
    assert torch.signbit(back[-7]) and not torch.signbit(back[-8])  # -0 stays -0, +0 stays +0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_ordered_bits_order_as_the_floats_do(dtype: torch.dtype) -> None:
    """The integer keys the CPU top-k compares sort floats of both signs, zeros and infinities as the floats sort."""
    from pipeline.sae.selection import ordered_bits

    gen = torch.Generator().manual_seed(4)
    scales = 10.0 ** torch.randint(-3, 4, (500,), generator=gen)  # six decades, so exponents differ too
    edges = torch.tensor([0.0, float("inf"), -float("inf"), 1e-30, -1e-30])
    values = torch.cat([torch.randn(500, generator=gen) * scales, edges]).to(dtype).unique()  # (V,) distinct
    keys = ordered_bits(values)
    assert not keys.is_floating_point()
    assert torch.equal(values[keys.argsort()], values.sort().values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cpu_tuned", [True, False])  # the CPU's sampled product; CUDA's embedding-bag kernel
def test_bag_dot_gives_each_entry_its_dot_product(dtype: torch.dtype, cpu_tuned: bool) -> None:
    """Both branches give every entry of a flat code <a[token], W[latent]> as the dense product does, with
    tokens that hold no entry, a latent twice in one token, and entries not sorted by latent."""
    gen = torch.Generator().manual_seed(6)
    a, weight = torch.randn(5, 7, generator=gen, dtype=dtype), torch.randn(9, 7, generator=gen, dtype=dtype)
    tokens = torch.tensor([0, 0, 0, 2, 2, 4, 4, 4, 4])  # tokens 1 and 3 hold nothing
    latents = torch.tensor([8, 1, 1, 0, 5, 3, 2, 8, 7])
    offsets = torch.tensor([0, 3, 3, 5, 5])
    want = (a @ weight.T)[tokens, latents]  # (E,)
    torch.testing.assert_close(kernels.bag_dot(a, weight, latents, offsets, tokens, cpu_tuned), want)


@pytest.mark.parametrize("cpu_tuned", [True, False])  # the CPU's embedding-bag kernel; CUDA's CSR product
def test_sparse_t_matmul_equals_the_dense_product(cpu_tuned: bool) -> None:
    """Both branches give S^T @ dense for a padded code and a flat one (tokens holding nothing, latents holding
    nothing, a latent in several tokens, entries not sorted by latent), as the dense matrix S gives it."""
    gen = torch.Generator().manual_seed(7)
    dense = torch.randn(5, 6, generator=gen)
    padded = torch.tensor([[3, 0], [3, 7], [1, 3], [0, 7], [7, 1]])  # latents 2, 4, 5, 6 hold nothing
    values = torch.randn(5, 2, generator=gen)
    matrix = torch.zeros(5, 8).scatter_(1, padded, values)  # (B, N)
    torch.testing.assert_close(kernels.sparse_t_matmul(padded, values, 8, dense, cpu_tuned=cpu_tuned), matrix.T @ dense)
    tokens, latents = torch.tensor([0, 0, 0, 2, 4, 4]), torch.tensor([6, 1, 2, 6, 2, 0])  # tokens 1 and 3 hold nothing
    flat_values = torch.randn(6, generator=gen)
    matrix = torch.zeros(5, 8).index_put_((tokens, latents), flat_values)
    got = kernels.sparse_t_matmul(latents, flat_values, 8, dense, tokens, cpu_tuned=cpu_tuned)
    torch.testing.assert_close(got, matrix.T @ dense)


@pytest.mark.parametrize("cpu_tuned", [True, False])
@pytest.mark.parametrize("n_rows", [kernels.SHORT_KEYS, kernels.SHORT_KEYS + 3])
def test_sparse_t_matmul_sorts_latent_ids_whatever_their_size(cpu_tuned: bool, n_rows: int) -> None:
    """The latent ids are sorted as int16 up to SHORT_KEYS latents and int32 past it: a dictionary's last ids
    (32767 in int16's range, 32768 and up past it) land on their own rows beside the first ones."""
    gen = torch.Generator().manual_seed(9)
    top = n_rows - 1
    latents = torch.tensor([[top, 0], [5, top], [top - 1, 32767], [0, 5]])  # (B, 2), ids at both ends
    values, dense = torch.randn(4, 2, generator=gen), torch.randn(4, 3, generator=gen)
    want = torch.zeros(4, n_rows).scatter_add_(1, latents, values).T @ dense  # (N, D)
    torch.testing.assert_close(kernels.sparse_t_matmul(latents, values, n_rows, dense, cpu_tuned=cpu_tuned), want)


def test_sparse_t_matmul_in_low_precision_rounds_its_operands_to_bf16() -> None:
    """With ``low_precision`` the CPU product is that of the operands rounded to bf16, summed in float32 and
    rounded once: within bf16's rounding of the dense product, and not the float32 one."""
    gen = torch.Generator().manual_seed(8)
    dense, latents = torch.randn(64, 32, generator=gen), torch.randint(0, 16, (64, 6), generator=gen)
    values = torch.rand(64, 6, generator=gen)

    def product(values: Tensor, dense: Tensor) -> Tensor:  # S^T @ dense in float64, repeated latents summed
        return torch.zeros(64, 16, dtype=torch.float64).scatter_add_(1, latents, values.double()).T @ dense.double()

    exact = product(values, dense).float()  # (N, D)
    rounded = product(values.bfloat16(), dense.bfloat16()).bfloat16().float()
    got = kernels.sparse_t_matmul(latents, values, 16, dense, low_precision=True, cpu_tuned=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rounded, rtol=2**-7, atol=1e-5)  # the sums' order and the one rounding
    assert 2**-12 < float((got - exact).norm() / exact.norm()) < 2**-7  # float32 sums would be ~2^-24 off


def test_sparse_decode_in_low_precision_rounds_its_operands_to_bf16() -> None:
    """With ``low_precision`` the decode is that of the values and decoder rows rounded to bf16, summed in float32
    and rounded once (as sparse_t_matmul's product): within bf16's rounding of it, and not the float32 decode."""
    gen = torch.Generator().manual_seed(9)
    w_dec, idx = torch.randn(16, 32, generator=gen), torch.randint(0, 16, (64, 6), generator=gen)
    vals = torch.rand(64, 6, generator=gen)

    def decode(vals: Tensor, w_dec: Tensor) -> Tensor:  # in float64
        return (vals.double()[:, :, None] * w_dec.double()[idx]).sum(1)  # (B, D)

    exact = decode(vals, w_dec).float()
    rounded = decode(vals.bfloat16(), w_dec.bfloat16()).bfloat16().float()
    got = kernels.SparseDecode.apply(vals, idx, w_dec, False, None, None, True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rounded, rtol=2**-7, atol=1e-5)
    assert 2**-12 < float((got - exact).norm() / exact.norm()) < 2**-7


@pytest.mark.parametrize("arch", ["topk", "transcoder", "batchtopk", "matryoshka"])
def test_a_low_precision_step_runs_every_sparse_product_in_bf16(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A training forward in low precision hands it to every decode and every weight-gradient product (seen by
    spies on both), a float32 one to none. Its W_enc and W_dec gradients are bf16's rounding away from the
    float32 step's; the others move only by what the decode's rounding does to the residual. The selection's
    GEMM stays float32 here, so both steps pick the same latents with the same values."""
    exact_gemm = selection.encoder_preacts
    for module in (selection, batchtopk):
        monkeypatch.setattr(module, "encoder_preacts", lambda x, encoders, _low: exact_gemm(x, encoders, False))
    seen: list[tuple[str, bool]] = []
    decode_forward, product = kernels.SparseDecode.forward, kernels.sparse_t_matmul

    def spied_decode(ctx: object, *args: object) -> Tensor:  # args end with low_precision when given
        seen.append(("decode", bool(args[6]) if len(args) > 6 else False))
        return decode_forward(ctx, *args)  # type: ignore[arg-type]

    def spied_product(*args: object, **kwargs: object) -> Tensor:
        seen.append(("product", bool(args[5]) if len(args) > 5 else bool(kwargs.get("low_precision", False))))
        return product(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels.SparseDecode, "forward", staticmethod(spied_decode))
    for module in (kernels, threshold):  # threshold imports it by name
        monkeypatch.setattr(module, "sparse_t_matmul", spied_product)
    d_in = 16
    cfg = SaeConfig(arch, d_in, 64, 4, [0], prefixes=[16, 64] if arch == "matryoshka" else [])
    x = torch.randn(32, 2, d_in) if arch == "transcoder" else torch.randn(32, d_in)
    grads = []
    for low_precision in (False, True):
        seen.clear()
        sae = REGISTRY[arch](cfg, torch.Generator().manual_seed(0)).train()
        sae.multi_topk = arch in ("topk", "batchtopk")  # the 4k code's decode too
        out = sae(x, low_precision=low_precision)
        step = Step(0, 0.0, torch.zeros(64, dtype=torch.bool), low_precision, lambda t: t)
        terms = sae.loss_terms(out, step, Training.of(FitConfig(arch=arch)))
        sum((t.value for t in terms), (out.x - out.x_hat).pow(2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
        assert {kind for kind, _ in seen} == {"decode", "product"}
        assert all(flag == low_precision for _, flag in seen), seen
    exact, low = grads
    for name in exact:
        gap = float((low[name] - exact[name]).norm() / exact[name].norm())
        assert (2**-12 < gap < 2**-7) if name in ("W_enc", "W_dec") else gap < 2**-7, (name, gap)


def test_dense_auxk_equals_the_sparse_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """AuxK's dense form (a few dead latents) gives the sparse kernels' output and gradients, the decoder's
    kept tangent to its unit rows."""
    torch.manual_seed(4)
    x, target = torch.randn(50, 16), torch.randn(50, 16)
    w_dec = torch.nn.functional.normalize(torch.randn(30, 16), dim=1)
    leaves = [torch.randn(30, 16), torch.randn(30) - 6, torch.randn(16) * 0.1, w_dec]  # some top-k below 0
    results = []
    for dense_up_to in (0, 1000):  # 0: always the sparse kernels; 1000: always the dense form
        monkeypatch.setattr(auxk_kernels, "DENSE_AUX", dense_up_to)
        params = [p.clone().requires_grad_() for p in leaves]
        guess = auxk_kernels.aux_decode(x, *params[:3], params[3], k=5, low_precision=False, tangent=True)
        (guess - target).pow(2).sum().backward()
        results.append([guess.detach(), *(p.grad for p in params)])
    for sparse, dense in zip(*results):
        torch.testing.assert_close(dense, sparse, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    grad = results[1][4]
    assert (grad * w_dec).sum(1).abs().max() < 1e-5 * grad.norm(dim=1).max()  # no radial part in its gradient


@pytest.mark.parametrize("dense_up_to", [0, 1000])  # 0: the sparse kernels; 1000: the dense form
def test_auxk_of_free_decoder_rows_takes_their_whole_gradient(
    monkeypatch: pytest.MonkeyPatch, dense_up_to: int
) -> None:
    """With ``tangent=False`` (a transcoder's free rows) AuxK's output and every gradient are those of a dense
    top-k written out here, the decoder's radial part kept."""
    torch.manual_seed(5)
    x, target = torch.randn(50, 16), torch.randn(50, 16)
    leaves = [torch.randn(30, 16), torch.randn(30) - 6, torch.randn(16) * 0.1, 0.5 * torch.randn(30, 16)]
    monkeypatch.setattr(auxk_kernels, "DENSE_AUX", dense_up_to)
    params = [p.clone().requires_grad_() for p in leaves]
    (auxk_kernels.aux_decode(x, *params[:4], k=5, low_precision=False, tangent=False) - target).pow(2).sum().backward()
    want = [p.clone().requires_grad_() for p in leaves]
    w_enc, b_enc, b_dec, w_dec = want
    pre = ((x - b_dec) @ w_enc.T + b_enc).relu()  # (B, n)
    top = pre.topk(5, dim=1)
    ((torch.zeros_like(pre).scatter(1, top.indices, top.values) @ w_dec - target).pow(2).sum()).backward()
    for name, got, ref in zip(("W_enc", "b_enc", "b_dec", "W_dec"), params, want):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-4, atol=1e-4, msg=f"{name}'s gradient")


def test_sparse_kernels_do_not_warn_of_segfaults() -> None:
    """Without an explicit opt-out torch warns once per process that sparse invariant checks are
    'implicitly disabled' (on torch 2.11 with CUDA the per-call argument alone did not stop it: every fit's
    output carried it). A fresh process, since the warning is shown only once."""
    code = (
        "import torch; from pipeline.sae.kernels import bag_dot, sparse_t_matmul; "
        "sparse_t_matmul(torch.tensor([[0, 2]]), torch.ones(1, 2), 3, torch.ones(1, 4), cpu_tuned=False); "
        "bag_dot(torch.ones(1, 4), torch.ones(3, 4), torch.tensor([0, 2]), torch.tensor([0]), torch.tensor([0, 0]))"
    )
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "invariant" not in done.stderr
