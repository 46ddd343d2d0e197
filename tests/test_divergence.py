"""KL and next-token cross-entropy from one log_softmax per forward, against sums written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.llm.divergence import kl_sum, log_probs, next_token_ce_sum, reference


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    clean, other = torch.randn(3, 6, 11) * 3, torch.randn(3, 6, 11) * 3  # (B, T, V)
    tokens = torch.randint(0, 11, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False  # padding at the end
    mask[1, 2] = False  # a position not stored, inside a sequence
    return clean, other, tokens, mask


def test_kl_sums_over_real_positions_only(batch: tuple[torch.Tensor, ...]) -> None:
    clean, other, _, mask = batch
    expected = 0.0
    for b, t in mask.nonzero().tolist():
        p = torch.softmax(clean[b, t].double(), 0)
        q = torch.softmax(other[b, t].double(), 0)
        expected += float((p * (p.log() - q.log())).sum())
    found = kl_sum(reference(log_probs(clean[mask])), log_probs(other[mask]))
    assert found == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_counts_a_real_token_predicted_from_a_real_one(batch: tuple[torch.Tensor, ...]) -> None:
    clean, _, tokens, mask = batch
    expected = 0.0
    for b in range(3):
        for t in range(5):  # the last position predicts nothing
            if mask[b, t] and mask[b, t + 1]:
                expected -= math.log(float(torch.softmax(clean[b, t].double(), 0)[tokens[b, t + 1]]))
    assert next_token_ce_sum(log_probs(clean[mask]), tokens, mask) == pytest.approx(expected, rel=1e-5)
