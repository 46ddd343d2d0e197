"""Comparing two runs of the same model by their logits: KL divergence and next-token cross-entropy.

Shared by `evaluate` (SAE spliced in vs clean) and `steer` (edited vs unedited)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kl_per_position(clean_logits: Tensor, other_logits: Tensor) -> Tensor:
    """KL(p_clean || p_other) at every position, (B, T), computed in float32."""
    clean = F.log_softmax(clean_logits.float(), dim=-1)
    other = F.log_softmax(other_logits.float(), dim=-1)
    return (clean.exp() * (clean - other)).sum(-1)


def ce_per_position(logits: Tensor, tokens: Tensor) -> Tensor:
    """Cross-entropy of predicting tokens[:, t+1] from position t, (B, T-1)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.shape[0], -1
    )
