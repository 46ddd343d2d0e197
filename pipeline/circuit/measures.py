"""How good a circuit is, on the held-out pairs.

With m(S) the mean logit difference when only the latents in S are kept (every other latent ablated,
every SAE error kept), C the circuit and A all latents:

    faithfulness  (m(C) - m(empty)) / (m(A) - m(empty))       1 = the circuit alone does the task
    completeness  (m(A \\ C) - m(empty)) / (m(A) - m(empty))  the circuit ablated and everything else kept:
                                                              near 0 = nothing outside it does the task
    size          latents in C, in all and per layer
    stability     Jaccard overlap |C1 & C2| / |C1 | C2| of two circuits (from neighbouring lambdas,
                  or from two methods at the same size)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.circuit.methods import Lens
from pipeline.circuit.spliced import Batch


class Baseline(NamedTuple):
    """The two ends every circuit is placed between, on the test pairs."""

    full: float  # m(A): every latent kept (= the clean model)
    empty: float  # m(empty): every latent ablated, errors kept
    solved: float  # share of test pairs whose clean logit difference is positive


class Score(NamedTuple):
    """The measures of one circuit."""

    size: int
    per_layer: dict[int, int]
    faithfulness: float
    completeness: float


@torch.no_grad()
def mean_ld(lens: Lens, test: list[Batch], keep: list[Tensor] | None) -> float:
    """m(S): the mean over the test pairs of the logit difference with ``keep`` (None: all latents)."""
    total = sum(float(lens.ld(b, keep).sum()) for b in test)
    return total / sum(len(b.clean) for b in test)


@torch.no_grad()
def baseline(lens: Lens, test: list[Batch]) -> Baseline:
    full = torch.cat([lens.ld(b, None) for b in test])  # (n_test,)
    empty = mean_ld(lens, test, [torch.zeros_like(k) for k in lens.ones()])
    return Baseline(float(full.mean()), empty, float((full > 0).float().mean()))


def measure(lens: Lens, test: list[Batch], base: Baseline, circuit: list[Tensor]) -> Score:
    """Faithfulness, completeness and size of ``circuit`` (per site, bool (N,))."""
    gap = base.full - base.empty
    kept = mean_ld(lens, test, [c.float() for c in circuit])
    rest = mean_ld(lens, test, [(~c).float() for c in circuit])
    per_layer = {site.layer: int(c.sum()) for site, c in zip(lens.sites, circuit)}
    return Score(sum(per_layer.values()), per_layer, (kept - base.empty) / gap, (rest - base.empty) / gap)


def jaccard(a: list[Tensor], b: list[Tensor]) -> float:
    """|a & b| / |a | b| over all sites (1 for two empty circuits)."""
    both = sum(int((x & y).sum()) for x, y in zip(a, b))
    either = sum(int((x | y).sum()) for x, y in zip(a, b))
    return both / either if either else 1.0
