"""Editing latents inside the running model, exactly.

At the SAE's layer the live activation h is normalized as the cache was (x, with per-token stats),
encoded to its code z, and the edits give z'. Two modes say what reaches the next block:

    delta    h + s * W_dec^T (z' - z)     only the change in the decoded code; everything the SAE
                                          does not edit, its reconstruction error included, passes
                                          through untouched (no edit, or scale 1: h exactly)
    replace  denorm(W_dec^T z' + b_dec)   the edited reconstruction (the RouteSAE reference's hook):
                                          the SAE's error is applied as well

s is the token's own normalization scale (its std for `standardize`; the mean cancels in a
difference). Hooks are removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.cache.normalize import Normalizer
from pipeline.llm.hooks import replace_input
from pipeline.sae.topk import Latents, TopKSAE
from pipeline.steer.edits import Edit, Positions

MODES = ("delta", "replace")


@dataclass
class Target:
    """The edits of one TopK SAE at its layer."""

    sae: TopKSAE
    layer: int  # model layer (input of block `layer`)
    normalizer: Normalizer  # the cache's normalization
    edits: list[Edit]
    a_max: dict[int, float] = field(default_factory=dict)  # latent -> largest activation (direction edits)


def code_change(target: Target, latents: Latents) -> Tensor:
    """W_dec^T (z' - z) for a batch of codes (M, k): the edits' change to the reconstruction (M, D)."""
    sae = target.sae
    change = torch.zeros(latents.acts.shape[0], sae.cfg.d_in, device=latents.acts.device)  # (M, D)
    for edit in target.edits:
        old = (latents.acts * (latents.indices == edit.latent)).sum(-1)  # (M,)
        new = edit.new_value(old, target.a_max.get(edit.latent, 1.0))  # (M,)
        change += (new - old)[:, None] * sae.W_dec[edit.latent]
    return change


@torch.no_grad()
def edit_hidden(h: Tensor, target: Target, mode: str) -> Tensor:
    """The edited version of the rows ``h`` (M, D) of the residual stream."""
    x, stats = target.normalizer.normalize(h, target.layer)  # (M, D)
    latents = target.sae.encode(x)
    change = code_change(target, latents)  # (M, D)
    if mode == "delta":
        return (h.float() + change * stats[1]).to(h.dtype)
    return target.normalizer.denormalize(target.sae.decode(latents) + change, stats).to(h.dtype)


@contextmanager
def steering(
    blocks: nn.ModuleList, targets: list[Target], mode: str, positions: Positions, prompt_len: int
) -> Iterator[None]:
    """Apply every target's edits during one `generate` (or one forward) of a single sequence.

    Positions are absolute: the first call sees the prompt, each later call (KV cache) one new token.
    """
    seen = {id(t): 0 for t in targets}

    def make_edit(target: Target):  # noqa: ANN202 - a hook function
        def edit(h: Tensor) -> Tensor:  # (1, T, D)
            start = seen[id(target)]
            seen[id(target)] = start + h.shape[1]
            where = positions.mask(start, h.shape[1], prompt_len, h.device)  # (T,)
            if not bool(where.any()):
                return h
            out = h.clone()
            out[:, where] = edit_hidden(h[:, where].flatten(0, 1), target, mode).view(h.shape[0], -1, h.shape[-1])
            return out

        return edit

    with ExitStack() as stack:
        for target in targets:
            stack.enter_context(replace_input(blocks[target.layer], make_edit(target)))
        yield
