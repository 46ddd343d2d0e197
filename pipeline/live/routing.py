"""The router branch: where a hard-routing multi-layer SAE (RouteSAE) sends each token of a live forward, and
the code an SAE gives the clean model's activations. Shared by `evaluate` (splicing), `steer` (edits land at
each token's routed layer) and the logit effects; asked through the SAE's forward, never its router's weights."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.infra.errors import UserError
from pipeline.live.edit import Site
from pipeline.llm.hooks import run_to_layers
from pipeline.sae.interface import Latents


class Routing(NamedTuple):
    """Per token of a batch, the layer a routed SAE reads it at and the weight it scales it by."""

    choice: Tensor  # (B, T) position in the SAE's cfg.layers
    weight: Tensor  # (B, T) routing weight of that layer (the SAE encodes weight * x)


def normalized_layers(model: nn.Module, blocks: nn.ModuleList, site: Site, tokens: Tensor) -> Tensor:
    """The clean model's normalized inputs (B, T, L, D) of every layer the site reads, from one forward."""
    hidden = run_to_layers(model, blocks, tokens, site.layers)
    return torch.stack([site.normalizer.normalize(hidden[layer], layer)[0] for layer in site.layers], dim=2)


@torch.no_grad()
def route_choice(model: nn.Module, blocks: nn.ModuleList, site: Site, tokens: Tensor) -> Routing:
    """Each token's routed layer and weight from a clean forward (hard routing: a soft-routed code mixes
    layers and has no single layer to go back to, which the stages refuse before they get here)."""
    out = site.sae(normalized_layers(model, blocks, site, tokens).flatten(0, 1))  # SaeOutput of B*T rows
    if out.layer_choice is None or out.layer_weights is None:
        raise UserError(f"run {site.name} routes softly: its code mixes layers, so no single layer can take it.")
    rows = torch.arange(len(out.layer_choice), device=tokens.device)
    weight = out.layer_weights[rows, out.layer_choice]  # (B*T,)
    return Routing(out.layer_choice.view(tokens.shape), weight.view(tokens.shape))


@torch.no_grad()
def clean_code(model: nn.Module, blocks: nn.ModuleList, site: Site, tokens: Tensor) -> Latents:
    """The SAE's code (B*T, k) of the clean model's activations for ``tokens`` (routed, for a routed SAE)."""
    xs = normalized_layers(model, blocks, site, tokens)  # (B, T, L, D)
    return site.sae(xs.flatten(0, 1) if site.routed else xs[:, :, 0].flatten(0, 1)).latents
