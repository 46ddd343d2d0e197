"""benchmarks/routesae: the centred-router variant is trained (unless --no-centre) and named in the table."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from benchmarks import routesae
from pipeline.fit.config import FitConfig


def args(centre: bool) -> argparse.Namespace:
    fields = {"latents": 64, "k": 4, "tokens": 1000, "rows": 300, "out": "o", "seeds": [0, 1]}
    return argparse.Namespace(**fields, topk_layers=[14], router_lr=[0.0], balance=[], centre=centre)


@pytest.mark.parametrize("centre", [True, False])
def test_the_centred_router_is_one_more_variant(monkeypatch: pytest.MonkeyPatch, centre: bool) -> None:
    asked: list[FitConfig] = []

    def trained(cfg: FitConfig) -> SimpleNamespace:
        asked.append(cfg)
        return SimpleNamespace(runs=[])

    monkeypatch.setattr(routesae.fit, "run", trained)
    routesae.runs("cache", args(centre))
    centred = [cfg for cfg in asked if cfg.router_centre]
    assert len(asked) == 3 + centre  # TopK, RouteSAE, reference recipe (and the centred one)
    assert [(cfg.arch, cfg.recipe, cfg.sweep) for cfg in centred] == [("route", "sae-pipe", {"seed": [0, 1]})] * centre


def test_the_centred_router_has_its_own_row_name() -> None:
    training = {"seed": 1, "router_lr": 5e-4, "lr": 4.9e-3}
    plain = routesae.label({"sae": {"arch": "route"}, "training": training})
    centred = routesae.label({"sae": {"arch": "route", "router_centre": True}, "training": training})
    assert plain == "RouteSAE, router lr 0.0005 (SAE lr 0.0049), seed 1"
    assert centred == "RouteSAE, router lr 0.0005 (SAE lr 0.0049), `--router-centre`, seed 1"
