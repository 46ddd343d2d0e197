"""Where a hard-routing RouteSAE sends each token of a live forward: shared by `evaluate` (splicing) and
`steer` (edits land at each token's routed layer)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.cache.normalize import Normalizer
from pipeline.llm.hooks import run_to_layers
from pipeline.sae.archs.route import RouteSAE


@torch.no_grad()
def route_choice(
    model: nn.Module, blocks: nn.ModuleList, sae: RouteSAE, normalizer: Normalizer, tokens: Tensor
) -> tuple[Tensor, Tensor]:
    """Per token, the routed layer's position in ``sae.cfg.layers`` and its weight, from a clean forward
    (hard routing only: `evaluate` refuses KL / CE for soft-routed runs)."""
    layers = sae.cfg.layers
    hidden = run_to_layers(model, blocks, tokens, layers)
    xs = torch.stack([normalizer.normalize(hidden[layer], layer)[0] for layer in layers], dim=2)  # (B, T, L, D)
    weights = sae.route(xs.flatten(0, 1))[0]  # (B*T, L)
    choice = weights.argmax(dim=-1)
    rows = torch.arange(len(choice), device=choice.device)
    return choice.view(tokens.shape), weights[rows, choice].view(tokens.shape)
