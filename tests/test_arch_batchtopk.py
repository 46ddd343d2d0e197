"""BatchTopK, Matryoshka BatchTopK and multi-TopK training, checked against hand computations in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig, Training
from pipeline.fit.train import make_member, train_step
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.sae.archs.batchtopk import batch_topk
from pipeline.sae.folder import load_sae
from pipeline.sae.interface import SAE, SaeConfig, Step, build_sae
from pipeline.sae.quality import Reconstruction
from tests.test_fit import cache, run_cfg  # noqa: F401 - the tiny cache fixture and fit settings of test_fit

LEGACY_TOPK_LOG = ["step", "tokens", "nmse", "fvu", "l0", "dead_share", "aux_loss", "lr", "tokens_per_s"]


def tiny(arch: str, d: int, n: int, k: int, seed: int = 0, **extra: object) -> SAE:
    """A float64 SAE of ``arch`` in training mode with random biases, so selections are not trivial."""
    sae = build_sae(SaeConfig(arch, d, n, k, [0], **extra), torch.Generator().manual_seed(seed)).double()  # type: ignore[arg-type]
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.copy_(0.2 * torch.randn(n, generator=gen))
        sae.b_dec.copy_(0.2 * torch.randn(d, generator=gen))
    return sae.train()


def rows(b: int, d: int, seed: int) -> torch.Tensor:
    """Rows of very different norms, so a batch top-k gives some rows many more latents than others."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, d, generator=gen, dtype=torch.float64) * torch.rand(b, 1, generator=gen, dtype=torch.float64) * 3
    )


def np_pre(sae: SAE, x: torch.Tensor) -> np.ndarray:
    """ReLU(W_enc (x - b_dec) + b_enc), written out in numpy."""
    w, b_enc, b_dec = (getattr(sae, n).detach().numpy() for n in ("W_enc", "b_enc", "b_dec"))
    return np.maximum((x.numpy() - b_dec) @ w.T + b_enc, 0)


def np_nmse(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(np.mean(((x - x_hat) ** 2).sum(1) / (x**2).sum(1)))


def np_batch_code(pre: np.ndarray, kept: int) -> np.ndarray:
    """The ``kept`` largest entries of the whole batch, the rest zero."""
    flat = pre.flatten()
    code = np.zeros_like(flat)
    top = np.argsort(-flat, kind="stable")[:kept]
    code[top] = flat[top]
    return code.reshape(pre.shape)


def no_step(n: int) -> Step:
    return Step(0, 0.0, torch.zeros(n, dtype=torch.bool), False, lambda t: t)


def dense(latents: tuple[torch.Tensor, torch.Tensor], n: int) -> np.ndarray:
    acts, ids = latents
    return torch.zeros(len(acts), n, dtype=acts.dtype).scatter_add(1, ids, acts).detach().numpy()


def test_batchtopk_keeps_exactly_k_times_b_activations_per_training_batch() -> None:
    sae, x = tiny("batchtopk", 16, 64, 4), rows(32, 16, 1)
    out = sae(x)
    assert int((out.latents.acts > 0).sum()) == 4 * 32  # k x B over the batch
    per_row = (out.latents.acts > 0).sum(1)
    assert int(per_row.max()) > 4 > int(per_row.min())  # not k per row: the busy rows take more
    assert out.latents.acts.shape[1] == int(per_row.max())  # padded with zeros to the busiest row only
    np.testing.assert_allclose(dense(out.latents, 64), np_batch_code(np_pre(sae, x), 4 * 32), atol=1e-12)


@pytest.mark.parametrize("case", ["overflow", "ties", "few_positive"])
def test_batch_topk_picks_the_batch_largest_entries_in_each_corner(case: str) -> None:
    """A row with more winners than its candidates, ties at the cut, and fewer positive entries than k x B."""
    pre = torch.randn(24, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # (B, N)
    if case == "overflow":
        pre[5] += 4.0  # row 5 holds all 40 of its entries among the 72 winners, 6 candidates each
    elif case == "ties":
        pre = (pre * 4).round() / 4  # values on a grid: many equal the cut
    else:
        pre -= 2.5  # about 14 positive entries for 72 places
    found = batch_topk(pre, 24 * 3, 6)  # (M,) flat positions
    assert bool(((found // 40).diff() >= 0).all())  # row by row, as SparsePre reads them
    got = torch.zeros(24 * 40, dtype=torch.float64).index_add_(0, found, torch.ones(len(found), dtype=torch.float64))
    np.testing.assert_array_equal(got.view(24, 40).numpy(), np_batch_code(np.maximum(pre.numpy(), 0), 24 * 3) > 0)


def sparse_rows(rng: np.random.Generator, b: int, dictionary: np.ndarray, active: int = 3) -> torch.Tensor:
    """Rows that are positive combinations of ``active`` random atoms of ``dictionary``."""
    ids = rng.random((b, len(dictionary))).argsort(1)[:, :active]  # (b, active) distinct atoms per row
    return torch.from_numpy(np.einsum("ra,rad->rd", rng.uniform(0.5, 2.0, (b, active)), dictionary[ids])).float()


def test_inference_threshold_reproduces_the_training_l0_on_held_out_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dictionary = rng.standard_normal((64, 32))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    settings = Training.of(FitConfig(arch="batchtopk", lr=1e-2), dead_tokens=10**9, k_aux=16)  # fit's schedule
    cfg = SaeConfig("batchtopk", 32, 128, 4, [0])
    member = make_member(Folder.at(tmp_path), cfg, settings, False, [0], torch.device("cpu"))
    member.model.start(sparse_rows(rng, 256, dictionary), no_step(128))
    for _ in range(300):
        train_step(member, sparse_rows(rng, 256, dictionary), total_steps=300)
    assert float(member.model.threshold) > 0 and "threshold" in member.model.state_dict()
    with torch.no_grad():
        held_out = member.model.eval().encode(sparse_rows(rng, 4096, dictionary))
    l0 = float((held_out.acts > 0).sum(1).float().mean())
    assert abs(l0 - 4) < 0.05 * 4, l0  # training keeps k = 4 per token on average


def test_matryoshka_loss_is_the_sum_of_its_prefixes_reconstructions() -> None:
    sae, x = tiny("matryoshka", 5, 12, 3, prefixes=[3, 6, 12]), rows(6, 5, 2)
    out = sae(x)
    terms = sae.loss_terms(out, no_step(12), Training.of(FitConfig(arch="matryoshka"), lr=1e-3, k_aux=4, dead_tokens=1))
    # by hand: the batch top-(k B) code, then each prefix's reconstruction from its latents alone
    code = np_batch_code(np_pre(sae, x), 3 * 6)  # (B, N)
    w_dec, b_dec, xs = sae.W_dec.detach().numpy(), sae.b_dec.detach().numpy(), x.numpy()
    by_prefix = {m: np_nmse(xs, code[:, :m] @ w_dec[:m] + b_dec) for m in (3, 6, 12)}
    inner = {t.name: (t.weight, float(t.value.detach())) for t in terms if t.name.startswith("prefix")}
    assert inner.keys() == {"prefix_3_nmse", "prefix_6_nmse"}
    for m in (3, 6):
        assert inner[f"prefix_{m}_nmse"] == pytest.approx((1.0, by_prefix[m]), abs=1e-12)
    loss = Reconstruction().add(out.x, out.x_hat) + sum(t.weight * t.value for t in terms)  # what fit minimizes
    assert float(loss.detach()) == pytest.approx(sum(by_prefix.values()), abs=1e-12)  # no AuxK: nothing is dead
    # a prefix alone is a BatchTopK SAE whose code is the full code's first latents
    sae.eval()
    small = sae.truncate(6)
    np.testing.assert_allclose(dense(small.encode(x), 6), dense(sae.encode(x), 12)[:, :6], atol=1e-12)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_a_training_step_has_the_gradients_of_a_dense_batch_top_k(arch: str) -> None:
    """Every parameter's gradient of a step's loss (the NMSE; Matryoshka: plus its prefixes') equals autograd's
    through a dense (B, N) batch top-k code: the flat code's kernels and the prefixes' cut codes lose nothing."""
    prefixes = [3, 6, 12] if arch == "matryoshka" else []
    sae, x = tiny(arch, 5, 12, 3, prefixes=prefixes), rows(6, 5, 2)
    out = sae(x)
    knobs = Training.of(FitConfig(arch=arch), lr=1e-3, k_aux=4, dead_tokens=1)
    terms = sae.loss_terms(out, no_step(12), knobs)
    (Reconstruction().add(out.x, out.x_hat) + sum(t.weight * t.value for t in terms)).backward()
    params = [getattr(sae, n).detach().clone().requires_grad_() for n in ("W_enc", "b_enc", "W_dec", "b_dec")]
    w_enc, b_enc, w_dec, b_dec = params
    pre = ((x - b_dec) @ w_enc.T + b_enc).relu()  # (B, N)
    kept = torch.zeros(pre.numel(), dtype=torch.bool)
    kept[pre.detach().flatten().topk(3 * 6).indices] = True
    code = pre * kept.view(pre.shape)  # (B, N) the batch top-k, differentiable
    sizes = prefixes or [12]
    want = sum(torch_nmse(x, code[:, :m] @ w_dec[:m] + b_dec) for m in sizes)
    for name, ref in zip(("W_enc", "b_enc", "W_dec", "b_dec"), torch.autograd.grad(want, params)):
        torch.testing.assert_close(getattr(sae, name).grad, ref, atol=1e-12, rtol=1e-10, msg=f"{name}'s gradient")


def torch_nmse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The normalized MSE in torch, differentiable (np_nmse's formula)."""
    return (((x - x_hat) ** 2).sum(1) / (x**2).sum(1)).mean()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_multi_topk_adds_the_4k_reconstruction_at_one_eighth(arch: str) -> None:
    sae, x = tiny(arch, 6, 40, 2), rows(8, 6, 3)
    sae.prepare_training(Training.of(FitConfig(arch=arch, multi_topk=True), lr=1e-3, k_aux=4, dead_tokens=1))
    out = sae(x)
    (term,) = [
        t
        for t in sae.loss_terms(
            out, no_step(40), Training.of(FitConfig(multi_topk=True), lr=1e-3, k_aux=4, dead_tokens=1)
        )
        if t.name == "multi_topk_loss"
    ]
    pre = np_pre(sae, x)
    if arch == "topk":  # each token's 4k = 8 largest
        cut = -np.sort(-pre, axis=1)[:, 7:8]
        code = np.where(pre >= cut, pre, 0)
    else:  # the batch's 4k x B largest
        code = np_batch_code(pre, 8 * 8)
    x_hat = code @ sae.W_dec.detach().numpy() + sae.b_dec.detach().numpy()
    assert (term.weight, float(term.value.detach())) == pytest.approx((1 / 8, np_nmse(x.numpy(), x_hat)), abs=1e-12)
    assert "multi_topk_loss" in sae.log_fields()


def header(run: Folder) -> list[str]:
    return (Path(run.url) / "log.csv").read_text().splitlines()[0].split(",")


def test_one_sweep_trains_every_architecture_as_each_trains_alone(cache: str, tmp_path: Path) -> None:  # noqa: F811
    runs = fit.run(
        run_cfg(cache, tmp_path / "sweep", max_tokens=4096, sweep={"arch": ["topk", "batchtopk", "matryoshka"]})
    ).runs
    topk, btk, mat = sorted(runs, key=lambda r: ["topk", "batchtopk", "matryoshka"].index(arch_of(r)))
    assert header(topk) == LEGACY_TOPK_LOG and "prefixes" not in topk.read_json("cfg.json")["sae"]
    model, _ = load_sae(btk)
    assert float(load_file(f"{btk.url}/sae.safetensors")["threshold"]) > 0 and float(model.threshold) > 0
    assert header(btk) == [*LEGACY_TOPK_LOG, "threshold"]
    assert mat.read_json("cfg.json")["sae"]["prefixes"] == [8, 16, 32, 64, 128]  # n/16 ... n
    assert header(mat)[-4:] == ["prefix_8_nmse", "prefix_16_nmse", "prefix_32_nmse", "prefix_64_nmse"]
    (solo,) = fit.run(run_cfg(cache, tmp_path / "solo", max_tokens=4096, arch="matryoshka")).runs
    for name, tensor in load_file(f"{solo.url}/sae.safetensors").items():
        torch.testing.assert_close(load_file(f"{mat.url}/sae.safetensors")[name], tensor, atol=1e-6, rtol=1e-5)


def test_multi_topk_is_logged_only_where_it_is_trained(cache: str, tmp_path: Path) -> None:  # noqa: F811
    (multi,) = fit.run(run_cfg(cache, tmp_path, arch="batchtopk", multi_topk=True, max_tokens=2048)).runs
    assert header(multi) == [*LEGACY_TOPK_LOG, "multi_topk_loss", "threshold"]
    assert multi.read_json("cfg.json")["training"]["multi_topk"] is True


def arch_of(run: Folder) -> str:
    return str(run.read_json("cfg.json")["sae"]["arch"])


@pytest.mark.parametrize(
    "prefixes, message",
    [("8,4,128", "must be increasing"), ("8,16,100", "ending at the number of latents"), ("8,x", "whole numbers")],
)
def test_bad_prefixes_are_refused(cache: str, tmp_path: Path, prefixes: str, message: str) -> None:  # noqa: F811
    with pytest.raises(UserError, match=message):
        fit.run(run_cfg(cache, tmp_path, arch="matryoshka", prefixes=prefixes))
