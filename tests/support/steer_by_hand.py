"""Steering written out by hand, independent of pipeline/steer: the expected values of the steering tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.llm.hooks import replace_input
from pipeline.sae.archs.topk import TopKSAE

SPECIAL = 0  # the tiny tokenizer's one special token, <|endoftext|> (EOS = BOS = pad)


def add_by_hand(
    rows: list[tuple[int, int, float]], latent: int, sae: TopKSAE, eps: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook adding ``step * std * d_latent`` at each (sequence, position, step) of ``rows``: the residual of a
    `direction` edit in delta mode (std = the token's own standardization scale, d = the decoder row)."""

    def add(h: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        out = h.clone()
        for b, t, step in rows:
            out[b, t] += step * (h[b, t].float().std() + eps) * sae.W_dec[latent]
        return out

    return add


@torch.no_grad()
def greedy_by_hand(
    model: nn.Module, block: nn.Module, ids: torch.Tensor, new_tokens: int, edit: tuple[int, float, TopKSAE, float]
) -> torch.Tensor:
    """Greedy continuation (1, T + n) of ``ids``, recomputing the whole sequence each step, with the direction
    edit ``(latent, step, sae, eps)`` added at every non-special position; stops after EOS like `generate`."""
    latent, step, sae, eps = edit
    seq = ids
    for _ in range(new_tokens):
        rows = [(0, t, step) for t in range(seq.shape[1]) if int(seq[0, t]) != SPECIAL]
        with replace_input(block, add_by_hand(rows, latent, sae, eps)):
            token = model(input_ids=seq).logits[0, -1].argmax()
        seq = torch.cat([seq, token.view(1, 1)], dim=1)
        if int(token) == SPECIAL:
            break
    return seq
