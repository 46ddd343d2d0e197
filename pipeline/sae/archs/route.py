"""RouteSAE: one shared TopK SAE fed by a router over several layers' residual streams.

The router maps the sum (or mean) of the routed layers to one logit per layer; its softmax
weights pick the input: ``hard`` routing feeds the top layer's activation times its weight,
``soft`` feeds the weighted sum of all routed layers. The SAE reconstructs that routed input.

Centred router (``router_centre``, not in the paper; issue 29): the router reads the summed layers minus
their running mean, the buffer ``router_mean`` (D,) of sae.safetensors. The sum of 16 standardized layers
of SmolLM2 keeps ~60 % of its energy along its mean, a direction every token shares, so an uncentred
router moves all tokens' logits together, towards one layer. Only the router's input is centred: the
SAE still encodes the routed layer as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import SAE, Knobs, Latents, LossTerm, SaeConfig, SaeOutput, Step, register

# The router's default peak lr: the reference's rate (swei2001/RouteSAEs, one Adam at 5e-4 for every
# parameter). The SAE's automatic rate, ten times more, collapses the routing (issue 29, docs/ROUTESAE.md).
ROUTER_LR = 5e-4


@register("route", trainable=True)
class RouteSAE(SAE):
    """A layer router plus a shared TopK SAE."""

    multi_layer = True
    loss_names = ("aux_loss",)
    default_router_lr = ROUTER_LR
    router_mean: Tensor  # (D,) the running mean of the router's summed input (router_centre only)

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
        if cfg.router_centre:  # a buffer only where used, so uncentred runs' sae.safetensors keep their keys
            self.register_buffer("router_mean", torch.zeros(cfg.d_in, device=device))
        self.batch_mean: Tensor | None = None  # (D,) the last training batch's summed-input mean, for after_step

    def route(self, xs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(layer weights (B, L), routed input (B, D), chosen layer (B,) for hard routing) from xs (B, L, D)."""
        summary = self.summary(xs)  # (B, D)
        if self.cfg.router_centre:
            if self.training:
                self.batch_mean = summary.detach().mean(0)  # (D,)
            summary = summary - self.router_mean  # (B, D)
        weights = torch.softmax(self.router(summary), dim=-1)  # (B, L)
        if self.cfg.routing == "soft":
            return weights, (weights[..., None] * xs).sum(dim=1), None
        choice = weights.argmax(dim=-1)  # (B,)
        rows = torch.arange(len(xs), device=xs.device)
        return weights, xs[rows, choice] * weights[rows, choice][:, None], choice

    def summary(self, xs: Tensor) -> Tensor:
        """The router's uncentred input (B, D): the sum or mean of the routed layers xs (B, L, D)."""
        return xs.sum(dim=1) if self.cfg.aggregate == "sum" else xs.mean(dim=1)

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
        return SaeOutput(x, self.sae.decode(latents, low_precision), latents, weights, choice)

    def dense_code(self, x: Tensor) -> Tensor:
        """The dense code of an already routed input (M, D)."""
        return self.sae.dense_code(x)

    def encoder_rows(self) -> tuple[Tensor, Tensor]:
        return self.sae.encoder_rows()

    def directions(self, latents: Sequence[int] | Tensor | None = None) -> Tensor:
        return self.sae.directions(latents)

    def normalize_decoder(self) -> None:
        self.sae.normalize_decoder()

    # --- training hooks: the shared SAE's (AuxK, revive, decoder norms; b_dec stays at zero, as the
    # reference keeps it: its input is ``w * x``, whose mean the router moves) plus the router's own ---

    def param_groups(self, knobs: Knobs) -> list[dict[str, Any]]:
        """The shared SAE at the SAE's rate, the router in a group of its own at ``knobs.router_lr``."""
        return [
            {"params": list(self.sae.parameters()), "lr": knobs.lr},
            {"params": [self.router.weight], "lr": knobs.router_lr},
        ]

    def prepare_training(self, knobs: Knobs) -> None:
        self.sae.prepare_training(knobs)

    def start(self, x: Tensor, step: Step) -> None:
        """A centred router starts from the first batch's mean, so its first step is already centred (the
        shared SAE has no start of its own here: b_dec stays at zero)."""
        if self.cfg.router_centre:
            with torch.no_grad():
                self.router_mean.copy_(step.average(self.summary(x).mean(0)))

    def loss_terms(self, out: SaeOutput, step: Step, knobs: Knobs) -> list[LossTerm]:
        terms = self.sae.loss_terms(out, step, knobs)
        if knobs.route_balance > 0 and out.layer_weights is not None:
            terms.append(LossTerm("balance_loss", knobs.route_balance, balance_loss(out.layer_weights)))
        return terms

    def after_step(self, out: SaeOutput, step: Step, knobs: Knobs) -> None:
        self.sae.after_step(out, step, knobs)
        if self.cfg.router_centre and self.batch_mean is not None:
            self.track_mean(step)

    @torch.no_grad()
    def track_mean(self, step: Step) -> None:
        """Fold the step's batch mean (averaged over ranks) into ``router_mean``: the plain mean of every batch
        so far. Not a moving average as BatchTopK's threshold: the cached rows do not move with the weights,
        so older batches are as good an estimate as new ones, and the plain mean only gets more exact."""
        assert self.batch_mean is not None
        batch = step.average(self.batch_mean)  # (D,)
        self.router_mean.lerp_(batch.to(self.router_mean.dtype), 1 / (step.number + 1))
        self.batch_mean = None

    def step_metrics(self, out: SaeOutput) -> dict[str, float]:
        """The batch's share of tokens per routed layer (hard) or mean weight (soft), and the entropy of the
        router's mean distribution in nats (log L = uniform, 0 = one layer takes all)."""
        assert out.layer_weights is not None  # a RouteSAE forward always routes
        with torch.no_grad():
            if out.layer_choice is not None:
                shares = torch.bincount(out.layer_choice, minlength=out.layer_weights.shape[1]).double()  # (L,)
                shares /= shares.sum()
            else:
                shares = out.layer_weights.double().mean(0)  # (L,)
            entropy = float(-(shares * shares.clamp_min(1e-12).log()).sum())
        return {"route_entropy": entropy, **{f"share_L{layer}": float(s) for layer, s in zip(self.cfg.layers, shares)}}

    def log_fields(self) -> list[str]:
        return ["router_lr", "route_entropy", *(f"share_L{layer}" for layer in self.cfg.layers)]


def balance_loss(weights: Tensor) -> Tensor:
    """L * sum_l p_l^2 over the batch's mean routing probabilities p (B, L) -> (L,): 1 when the router
    spreads tokens evenly, L when it sends all of them to one layer. Not in the RouteSAE paper: an
    opt-in guard against router collapse (`--route-balance`, weight 0 by default)."""
    mean = weights.mean(0)  # (L,)
    return len(mean) * mean.square().sum()


def core_sae(model: TopKSAE | RouteSAE) -> TopKSAE:
    """The TopK SAE inside a model: the model itself, or a RouteSAE's shared SAE."""
    return model.sae if isinstance(model, RouteSAE) else model
