"""RouteSAE's centred router (`--router-centre`, issue 29): the router reads the summed layers minus their
running mean. Checked against numpy: the logits, the mean it tracks, and a saved run's routing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pipeline.cache.reader import ActivationCache
from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig, Training
from pipeline.fit.plan import expand_sweep, parse_sweep, plan_run
from pipeline.fit.train import init_pre_bias, make_member, step_of, train_step
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.sae.archs.route import RouteSAE
from pipeline.sae.folder import load_sae
from pipeline.sae.interface import SaeConfig
from tests.support.caches import synthetic_cache

CPU = torch.device("cpu")
CENTRED = SaeConfig("route", 8, 32, 2, [1, 2, 3], router_centre=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_the_centred_router_reads_the_sum_minus_its_mean() -> None:
    """Layer weights = softmax(W (sum_l x_l - mean)), written out in numpy on a tiny example."""
    rng = np.random.default_rng(0)
    xs, w, mean = rng.normal(size=(5, 3, 8)), rng.normal(size=(3, 8)), rng.normal(size=8) * 3
    sae = RouteSAE(CENTRED).eval()
    with torch.no_grad():
        sae.router.weight.copy_(torch.tensor(w))
        sae.router_mean.copy_(torch.tensor(mean))
    out = sae(torch.tensor(xs, dtype=torch.float32))
    expected = softmax((xs.sum(1) - mean) @ w.T)  # (B, L)
    np.testing.assert_allclose(out.layer_weights.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert out.layer_choice.tolist() == expected.argmax(1).tolist()
    assert "router_mean" not in RouteSAE(SaeConfig("route", 8, 32, 2, [1, 2, 3])).state_dict()  # off: no buffer


def test_the_mean_tracks_the_training_data_and_stays_still_in_eval_mode(tmp_path: Path) -> None:
    """After N training steps the mean is the numpy mean of every batch's summed layers; an eval-mode forward
    (and any hook after it) leaves it where it is."""
    settings = Training.of(FitConfig(arch="route", lr=1e-3, router_lr=1e-3), dead_tokens=10**9, k_aux=4)
    member = make_member(Folder.at(tmp_path / "run"), CENTRED, settings, False, [0, 1, 2], CPU)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 3, 8, generator=gen) + torch.arange(8.0) for _ in range(6)]  # a non-zero mean
    init_pre_bias(member, batches[0])
    for x in batches:
        train_step(member, x, total_steps=6)
    seen = np.stack([x.numpy() for x in batches]).sum(2).reshape(-1, 8).mean(0)  # (D,) over all 192 rows
    np.testing.assert_allclose(member.model.router_mean.numpy(), seen, rtol=1e-5, atol=1e-5)
    model = member.model.eval()
    frozen = model.router_mean.clone()
    out = model(batches[0] * 5 - 40)
    model.after_step(out, step_of(member, 6), settings)
    assert torch.equal(model.router_mean, frozen)


def test_a_centred_run_saves_loads_and_evaluates_with_its_routing(tmp_path: Path) -> None:
    """The mean lands in sae.safetensors and cfg.json says the router is centred; the loaded SAE and the
    evaluate stage route the held-out rows as numpy does from the saved tensors."""
    cache = synthetic_cache(tmp_path, [600], layers=(0, 1, 2), d=16, heldout_rows=64)
    common = {"cache": cache.url, "arch": "route", "latents": 64, "k": 4, "batch_size": 128, "device": "cpu"}
    run = fit.run(FitConfig(**common, router_centre=True, out=str(tmp_path / "saes"))).runs[0]  # type: ignore[arg-type]
    saved = load_file(str(run.local() / "sae.safetensors"))
    model, cfg = load_sae(run)
    assert cfg["sae"]["router_centre"] is True and np.abs(saved["router_mean"]).max() > 0.1
    (_, rows), *_ = ActivationCache.open(cache.url).heldout_rows([0, 1, 2])  # (n, L, D)
    choice = ((rows.sum(1) - saved["router_mean"]) @ saved["router.weight"].T).argmax(1)  # (n,)
    assert model(torch.tensor(rows)).layer_choice.tolist() == choice.tolist()
    shares = np.bincount(choice, minlength=3) / len(choice)
    eval_cfg = EvaluateConfig(runs=[run.url], metrics=["nmse"], device="cpu", out=str(tmp_path / "ev"))
    (metrics,) = evaluate.run(eval_cfg).metrics
    np.testing.assert_allclose(list(metrics["routing_shares"].values()), shares, atol=1e-9)


def test_router_centre_is_swept_named_and_refused_where_there_is_no_router(tmp_path: Path) -> None:
    """--sweep router_centre=false,true gives both runs; off, cfg.json has no router_centre key (so runs
    named before it keep their folders); a TopK run has no router to centre."""
    cache = ActivationCache.open(synthetic_cache(tmp_path, [300], layers=(0, 1, 2)).url)
    base = FitConfig(cache=cache.folder.url, arch="route", latents=64, out=str(tmp_path / "o"))
    swept = expand_sweep(dataclasses.replace(base, sweep=parse_sweep(["router_centre=false,TRUE"])))
    assert [c.router_centre for c in swept] == [False, True]
    off, on = (plan_run(c, cache) for c in swept)
    assert "router_centre" not in off.record["sae"] and on.record["sae"]["router_centre"] is True
    assert off.folder.name == plan_run(base, cache).folder.name != on.folder.name
    with pytest.raises(UserError, match="--router-centre .* --arch topk has none"):
        plan_run(FitConfig(cache=cache.folder.url, layer=1, latents=64, router_centre=True), cache)
