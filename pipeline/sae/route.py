"""RouteSAE: one shared TopK SAE fed by a router over several layers' residual streams.

The router maps the sum (or mean) of the routed layers to one logit per layer; its softmax
weights pick the input: ``hard`` routing feeds the top layer's activation times its weight,
``soft`` feeds the weighted sum of all routed layers. The SAE reconstructs that routed input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.sae.interface import SAE, register
from pipeline.sae.topk import Latents, SaeConfig, SaeOutput, TopKSAE


@register("route", trainable=True)
class RouteSAE(SAE):
    """A layer router plus a shared TopK SAE."""

    def __init__(
        self, cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.sae = TopKSAE(cfg, generator, device)
        bound = cfg.d_in**-0.5
        router = (torch.rand(len(cfg.layers), cfg.d_in, generator=generator) * 2 - 1) * bound  # (L, D)
        self.router = nn.Linear(cfg.d_in, len(cfg.layers), bias=False, device=device)
        with torch.no_grad():
            self.router.weight.copy_(router)

    def route(self, xs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(layer weights (B, L), routed input (B, D), chosen layer (B,) for hard routing) from xs (B, L, D)."""
        summary = xs.sum(dim=1) if self.cfg.aggregate == "sum" else xs.mean(dim=1)  # (B, D)
        weights = torch.softmax(self.router(summary), dim=-1)  # (B, L)
        if self.cfg.routing == "soft":
            return weights, (weights[..., None] * xs).sum(dim=1), None
        choice = weights.argmax(dim=-1)  # (B,)
        rows = torch.arange(len(xs), device=xs.device)
        return weights, xs[rows, choice] * weights[rows, choice][:, None], choice

    def encode(
        self, x: Tensor, k: int | None = None, theta: float | None = None, low_precision: bool = False
    ) -> Latents:
        """Encode an already routed input (B, D)."""
        return self.sae.encode(x, k, theta, low_precision)

    def decode(self, latents: Latents) -> Tensor:
        return self.sae.decode(latents)

    def forward(
        self, xs: Tensor, k: int | None = None, theta: float | None = None, low_precision: bool = False
    ) -> SaeOutput:
        weights, x, choice = self.route(xs)
        latents = self.sae.encode(x, k, theta, low_precision)
        return SaeOutput(x, self.sae.decode(latents), latents, weights, choice)

    def dense_code(self, x: Tensor) -> Tensor:
        """The dense code of an already routed input (M, D)."""
        return self.sae.dense_code(x)

    def directions(self, latents: Sequence[int] | Tensor | None = None) -> Tensor:
        return self.sae.directions(latents)

    def normalize_decoder(self) -> None:
        self.sae.normalize_decoder()


def core_sae(model: TopKSAE | RouteSAE) -> TopKSAE:
    """The TopK SAE inside a model: the model itself, or a RouteSAE's shared SAE."""
    return model.sae if isinstance(model, RouteSAE) else model
