"""Splicing an SAE into the running LLM: replace the residual stream at its layer with the reconstruction.

The live activation is normalized exactly as the cache was (per-token statistics for
``standardize``, the cache's factor for ``scale``), encoded, decoded and de-normalized. Only real
(non-special) positions are replaced, the positions the SAE was trained on. For a hard-routing
RouteSAE, the router (run on the clean activations) picks one layer per token, and the token is
replaced at that layer only, with the routing weight undone (or not: ``--splice paper``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from pipeline.cache.normalize import Normalizer
from pipeline.llm.hooks import replacing
from pipeline.llm.replay import resume, stem
from pipeline.llm.unembed import final_norm
from pipeline.sae.archs.route import RouteSAE
from pipeline.sae.archs.topk import TopKSAE

Edit = Callable[[Tensor], Tensor]  # (B, T, D) hidden state -> replacement


def logits_with(model: nn.Module, blocks: nn.ModuleList, tokens: Tensor, edits: dict[int, Edit]) -> Tensor:
    """Logits (B, T, V) of a forward in which block L's input h becomes ``edits[L](h)``."""
    with replacing(blocks, edits):
        return model(input_ids=tokens, use_cache=False).logits


class Branches:
    """One batch's forwards that differ only from ``layer`` up (clean, zeroed, each run spliced): the blocks
    below ``layer`` run once, in the clean forward, and every edited forward resumes from there
    (llm/replay.py). ``replay=False`` (a model whose output replay cannot rebuild) runs each one whole.
    Logits come only at the positions ``at`` (B, T) marks: the LM head, a fifth of a small model's
    forward, never runs on padding, and no (B, T, V) matrix is copied to pick the real rows."""

    def __init__(
        self, model: nn.Module, blocks: nn.ModuleList, tokens: Tensor, layer: int, replay: bool, at: Tensor
    ) -> None:
        self.model, self.blocks, self.tokens, self.at = model, blocks, tokens, at
        self.start = stem(model, blocks, tokens, layer) if replay else None
        self.head = model.get_output_embeddings()  # type: ignore[operator]

    def clean(self) -> Tensor:
        """Logits (n, V) of the unedited forward at the n marked positions."""
        if self.start is None:
            return logits_with(self.model, self.blocks, self.tokens, {})[self.at]
        return self.head(self.start.last[self.at])

    def edited(self, edits: dict[int, Edit]) -> Tensor:
        """Logits (n, V) with ``edits`` (at ``layer`` or above), at the marked positions."""
        if self.start is None:
            return logits_with(self.model, self.blocks, self.tokens, edits)[self.at]
        with replacing(self.blocks, edits):
            return self.head(resume(self.model, self.blocks, self.start)[self.at])


@torch.no_grad()  # a check: three forwards that need no autograd graph, whoever calls it
def replays_exactly(model: nn.Module, blocks: nn.ModuleList, tokens: Tensor, layer: int) -> bool:
    """Whether branching rebuilds this model's logits: clean and resumed-unedited logits equal a whole
    forward's (a model with logit soft-capping or scaling, or a final norm replay does not know, fails)."""
    if final_norm(model) is None or model.get_output_embeddings() is None:  # type: ignore[operator]
        return False
    everywhere = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)  # (B, T)
    branches = Branches(model, blocks, tokens, layer, replay=True, at=everywhere)
    whole = logits_with(model, blocks, tokens, {}).flatten(0, 1)  # (B * T, V)
    scale = whole.abs().max().clamp_min(1e-6)
    return all(float((b - whole).abs().max() / scale) < 1e-4 for b in (branches.clean(), branches.edited({})))


def _replace(h: Tensor, where: Tensor, values: Tensor) -> Tensor:
    out = h.clone()
    out[where] = values.to(h.dtype)
    return out


def topk_edits(
    sae: TopKSAE, normalizer: Normalizer, layer: int, mask: Tensor, k: int | None, theta: float | None
) -> dict[int, Edit]:
    """Replace real positions (``mask``, (B, T)) at ``layer`` with the SAE reconstruction."""

    def edit(h: Tensor) -> Tensor:
        x, stats = normalizer.normalize(h[mask], layer)  # (M, D)
        x_hat = sae(x, k=k, theta=theta).x_hat
        return _replace(h, mask, normalizer.denormalize(x_hat, stats))

    return {layer: edit}


def zero_edits(layers: list[int], masks: list[Tensor]) -> dict[int, Edit]:
    """Zero the residual stream at each layer's masked positions."""

    def zeroing(mask: Tensor) -> Edit:
        return lambda h: _replace(h, mask, torch.zeros_like(h[mask]))

    return {layer: zeroing(mask) for layer, mask in zip(layers, masks)}


def route_edits(
    sae: RouteSAE,
    normalizer: Normalizer,
    mask: Tensor,
    choice: Tensor,
    weight: Tensor,
    k: int | None,
    theta: float | None,
    undo_weight: bool = True,
) -> dict[int, Edit]:
    """At each routed layer, replace the real positions routed there; other positions stay clean.

    The SAE reconstructs ``w * x`` (w = the routing weight). ``undo_weight`` splices ``x_hat / w``, an
    activation on the model's own scale (`--splice scaled`, our default); without it ``x_hat`` goes in
    as it is, as the RouteSAE reference does (`--splice paper`: KL comparable with the paper's, but it
    also measures the damage of shrinking the residual stream by w).
    """
    edits: dict[int, Edit] = {}
    for i, layer in enumerate(sae.cfg.layers):
        here = mask & (choice == i)  # (B, T)

        def edit(h: Tensor, here: Tensor = here, layer: int = layer) -> Tensor:
            if not bool(here.any()):
                return h
            x, stats = normalizer.normalize(h[here], layer)  # (M, D)
            w = weight[here][:, None]  # (M, 1)
            x_hat = sae.decode(sae.encode(x * w, k=k, theta=theta))
            if undo_weight:
                x_hat = x_hat / w
            return _replace(h, here, normalizer.denormalize(x_hat, stats))

        edits[layer] = edit
    return edits
