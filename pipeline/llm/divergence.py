"""Comparing two runs of the same model by their logits: KL divergence and next-token cross-entropy.

Shared by `evaluate` (SAE spliced in vs clean) and `steer` (edited vs unedited)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def ce_per_position(logits: Tensor, tokens: Tensor) -> Tensor:
    """Cross-entropy of predicting tokens[:, t+1] from position t, (B, T-1)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.shape[0], -1
    )


class Reference(NamedTuple):
    """The clean forward's next-token distribution at the real positions, kept to compare others with."""

    probs: Tensor  # (n, V) float32
    neg_entropy: Tensor  # (n,) sum_v p log p: the part of KL(p || q) that q does not change


def log_probs(logits: Tensor) -> Tensor:
    """Next-token log-probabilities in float32 over the last dimension of ``logits`` (..., V)."""
    return F.log_softmax(logits.float(), dim=-1)


def reference(clean_log_probs: Tensor) -> Reference:
    """What KL against the clean distribution needs, computed once for any number of others (n, V)."""
    probs = clean_log_probs.exp()  # (n, V)
    return Reference(probs, torch.linalg.vecdot(probs, clean_log_probs))


def kl_rows(clean: Reference, other_log_probs: Tensor) -> Tensor:
    """KL(p_clean || p_other) = sum_v p log p - sum_v p log q per position (n,), differentiable in the other."""
    return clean.neg_entropy - torch.linalg.vecdot(clean.probs, other_log_probs)


def kl_sum(clean: Reference, other_log_probs: Tensor) -> float:
    """Sum over positions of KL(p_clean || p_other)."""
    return float(kl_rows(clean, other_log_probs).sum())


def next_token_log_likelihoods(log_probs: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """log q(tokens[:, t+1]) (m,) at every real position t whose next token is real too, from ``log_probs``
    (n, V) at the positions ``mask`` (B, T) marks, in their order."""
    following = torch.roll(tokens, -1, dims=1)[mask]  # (n,) the next token of each real position
    scored = F.pad(mask[:, 1:], (0, 1))[mask]  # (n,) whether that next token is real (never past the end)
    return log_probs[scored].gather(1, following[scored, None])[:, 0]


def next_token_ce_sum(log_probs: Tensor, tokens: Tensor, mask: Tensor) -> float:
    """Summed next-token cross-entropy over the positions :func:`next_token_log_likelihoods` scores."""
    return -float(next_token_log_likelihoods(log_probs, tokens, mask).sum())
