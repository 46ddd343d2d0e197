"""RouteSAE training: the router's own learning rate and the paper's reference recipe, each checked
against a step computed by hand, the reference's decoder renormalization period and its data order."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.reader import ActivationCache
from pipeline.cache.stream import ActivationStream, StreamSpec
from pipeline.fit import stage
from pipeline.fit.config import FitConfig, Training, with_recipe
from pipeline.fit.optim import lr_factor
from pipeline.fit.plan import plan_run
from pipeline.fit.train import make_member, train_step
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.sae.interface import SaeConfig, Step
from tests.support.caches import synthetic_cache

CPU = torch.device("cpu")
ROUTE = SaeConfig("route", 8, 32, 2, [1, 2, 3])


def member(tmp_path: Path, cfg: FitConfig) -> object:
    settings = Training.of(cfg, dead_tokens=10**9, k_aux=4)
    return make_member(Folder.at(tmp_path / "run"), ROUTE, settings, False, [0, 1, 2], CPU)


def first_step(g: torch.Tensor, lr: float, optimizer: str) -> torch.Tensor:
    """A parameter's change in its first step from rest, written out: Adam's m / (sqrt(v) + eps) is
    g / (|g| + eps) (bias-corrected, m = (1 - b1) g, v = (1 - b2) g^2); Signum's is sign((1 - beta) g)."""
    return -lr * (g.sign() if optimizer == "signum" else g / (g.abs() + 1e-8))


@pytest.mark.parametrize("optimizer", ["adam", "signum", "muon"])
def test_the_router_steps_at_its_own_rate(tmp_path: Path, optimizer: str) -> None:
    """The router steps at router_lr, the SAE at lr, under every optimizer (Muon: the router is Adam's)."""
    cfg = FitConfig(arch="route", lr=1e-2, router_lr=1e-4, schedule="constant", optimizer=optimizer)
    m = member(tmp_path, cfg)
    with torch.no_grad():  # with both biases at zero the NMSE ignores the routed input's scale: no router gradient
        m.model.sae.b_dec.copy_(torch.randn(8, generator=torch.Generator().manual_seed(2)))
    before = copy.deepcopy(m.model.state_dict())
    grads: dict[str, torch.Tensor] = {}
    step = m.optimizer.step

    def record_then_step() -> None:
        grads.update(router=m.model.router.weight.grad.clone(), b_enc=m.model.sae.b_enc.grad.clone())
        step()

    m.optimizer.step = record_then_step
    train_step(m, torch.randn(64, 3, 8, generator=torch.Generator().manual_seed(0)), total_steps=10)
    # a vector (b_enc) stays off Muon, so the SAE's rate shows under every optimizer
    for name, key, lr in (("router", "router.weight", 1e-4), ("b_enc", "sae.b_enc", 1e-2)):
        now = m.model.state_dict()[key]
        torch.testing.assert_close(now, before[key] + first_step(grads[name], lr, optimizer), rtol=0, atol=1e-7)
    assert grads["router"].abs().max() > 1e-6  # the router did get a gradient to step on


def test_the_reference_schedule_at_a_few_steps() -> None:
    # by hand from the reference's LinearWarmupLR with 100 steps: W = 5, decay from step 80 as (95 - s) / 75
    steps = (0, 3, 5, 79, 80, 90, 94, 95, 99)
    expected = [0.0, 0.6, 1.0, 1.0, 0.2, 5 / 75, 1 / 75, 0.0, 0.0]
    assert [lr_factor(s, 100, "reference") for s in steps] == pytest.approx(expected)
    # 37 steps: W = int(1.85) = 1, decay from 37 - 37 // 5 = 30 as (36 - s) / 29, zero from step 36
    steps = (0, 1, 29, 30, 35, 36)
    assert [lr_factor(s, 37, "reference") for s in steps] == pytest.approx([0.0, 1.0, 1.0, 6 / 29, 1 / 29, 0.0])


def reference_step(model: dict[str, torch.Tensor], xs: torch.Tensor, opt: torch.optim.Optimizer, lr: float) -> None:
    """One step of the paper's training written out: router on the summed layers, hard routing scaled by
    the top weight, top-2 of the pre-activations, normalized MSE per token, plain Adam."""
    weights = torch.softmax(xs.sum(1) @ model["router"].T, dim=-1)  # (B, L)
    top, layer = weights.max(dim=-1)  # (B,)
    x = xs[torch.arange(len(xs)), layer] * top[:, None]  # (B, D)
    pre = (x - model["b_dec"]) @ model["W_enc"].T + model["b_enc"]  # (B, N)
    vals, idx = pre.topk(2, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())  # (B, N)
    x_hat = z @ model["W_dec"] + model["b_dec"]  # (B, D)
    loss = ((x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_the_reference_recipe_takes_the_steps_of_the_paper(tmp_path: Path) -> None:
    cfg = with_recipe(FitConfig(arch="route", recipe="reference"))
    assert (cfg.lr, cfg.router_lr, cfg.batch_size, cfg.aux_alpha, cfg.schedule) == (5e-4, 5e-4, 8192, 0.0, "reference")
    m = member(tmp_path, cfg)
    with torch.no_grad():  # nonzero biases give the router a real gradient (see the test above)
        m.model.sae.b_dec.copy_(torch.randn(8, generator=torch.Generator().manual_seed(2)))
    sd = m.model.state_dict()
    mine = {
        "router": sd["router.weight"].clone().requires_grad_(),
        **{name: sd[f"sae.{name}"].clone().requires_grad_() for name in ("W_enc", "b_enc", "W_dec", "b_dec")},
    }
    opt = torch.optim.Adam(list(mine.values()), lr=5e-4, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(1)
    total = 200  # warmup over 10 steps: lr 0 at step 0, 5e-5 at step 1, ...
    for step in range(3):
        xs = torch.randn(32, 3, 8, generator=gen)
        train_step(m, xs, total_steps=total)
        reference_step(mine, xs, opt, 5e-4 * step / 10)
        if step % 100 == 0:  # the reference renormalizes decoder atoms after batch 0, 100, 200, ...
            with torch.no_grad():
                mine["W_dec"] /= mine["W_dec"].norm(dim=1, keepdim=True)
    torch.testing.assert_close(m.model.router.weight.detach(), mine["router"].detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.model.sae.W_dec.detach(), mine["W_dec"].detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.model.sae.W_enc.detach(), mine["W_enc"].detach(), rtol=1e-4, atol=1e-6)
    assert (m.model.sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-6  # atoms drift between renormalizations


def test_the_reference_recipe_refuses_settings_it_would_override() -> None:
    with pytest.raises(UserError, match="--recipe reference fixes .*drop --batch-size 2048"):
        with_recipe(FitConfig(arch="route", recipe="reference", batch_size=2048))
    with pytest.raises(UserError, match="drop --lr"):
        with_recipe(FitConfig(arch="route", recipe="reference", sweep={"lr": [1e-3, 2e-3]}))


def test_the_router_rate_is_resolved_for_routers_only(tmp_path: Path) -> None:
    """0 means the reference's 5e-4 for a RouteSAE; an architecture without a router ignores --router-lr, so
    its cfg.json (and folder name) stays as it was before the setting existed."""
    cache = ActivationCache.open(synthetic_cache(tmp_path, [300], layers=(0, 1, 2)).url)
    common = {"cache": cache.folder.url, "out": str(tmp_path / "o"), "latents": 64}
    route = plan_run(FitConfig(arch="route", **common), cache).training  # type: ignore[arg-type]
    chosen = plan_run(FitConfig(arch="route", router_lr=1e-3, **common), cache).training  # type: ignore[arg-type]
    topk = plan_run(FitConfig(layer=1, router_lr=1e-3, **common), cache)  # type: ignore[arg-type]
    assert (route.router_lr, chosen.router_lr, topk.training.router_lr) == (5e-4, 1e-3, 0.0)
    assert "router_lr" not in topk.record["training"]


def test_the_reference_recipe_renormalizes_the_decoder_every_100_steps(tmp_path: Path) -> None:
    cfg = with_recipe(FitConfig(arch="route", recipe="reference"))
    model = member(tmp_path, cfg).model  # type: ignore[attr-defined]
    out = model(torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0)))
    unit = []
    for number in (10, 50, 99, 100, 101, 199, 200):
        with torch.no_grad():
            model.sae.W_dec.mul_(2.0)  # rows of norm 2 (or 4, ...) unless this step renormalizes
        model.after_step(out, Step(number, number / 300, torch.zeros(32, dtype=torch.bool), False, lambda t: t), cfg)
        unit.append(bool(torch.allclose(model.sae.W_dec.norm(dim=1), torch.ones(32))))
    assert unit == [False, False, False, True, False, False, True]


def test_the_unshuffled_stream_serves_the_rows_as_stored(tmp_path: Path) -> None:
    """The reference's data order: shards in index order, rows as stored, epoch after epoch. The pool (2,056
    rows) holds less than the data, so it is served and compacted on the way; 2 x 2,100 rows make 32 full
    batches of 128 and the last 104 rows are dropped."""
    cache = ActivationCache.open(synthetic_cache(tmp_path, [700, 900, 500], layers=(0,), d=8))
    stored = np.concatenate([cache.read(i, "train/act", 0) for i in sorted(s["index"] for s in cache.shards)])
    stream = ActivationStream(cache, StreamSpec([0], 128, seed=3, pool_mb=0.01, shuffle=False))
    served = np.concatenate([batch[0] for batch in stream.batches(2)])  # (4096, 8)
    np.testing.assert_array_equal(served, np.concatenate([stored, stored])[: 32 * 128])


@pytest.mark.parametrize(("recipe", "shuffle"), [("reference", False), ("sae-pipe", True)])
def test_fit_reads_in_order_under_the_reference_recipe_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str, shuffle: bool
) -> None:
    specs: list[StreamSpec] = []

    def recording(cache: ActivationCache, spec: StreamSpec) -> ActivationStream:
        specs.append(spec)
        return ActivationStream(cache, spec)

    monkeypatch.setattr(stage, "ActivationStream", recording)
    cache = synthetic_cache(tmp_path, [8300], layers=(0, 1, 2), d=8)
    cfg = FitConfig(cache=cache.url, out=str(tmp_path / "o"), arch="route", latents=32, k=2, batch_size=8192)
    stage.run(dataclasses.replace(cfg, recipe=recipe, max_tokens=8192, device="cpu", pool_mb=1))
    assert [spec.shuffle for spec in specs] == [shuffle]
