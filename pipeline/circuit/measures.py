"""How good a circuit is, on a set of pairs (validation to choose, test to report).

With m(S) the mean logit difference when only the latents in S are kept (every other latent ablated,
every SAE error kept), C the circuit and A all latents:

    faithfulness  (m(C) - m(empty)) / (m(A) - m(empty))       1 = the circuit alone does the task
    completeness  (m(A \\ C) - m(empty)) / (m(A) - m(empty))  the circuit ablated and everything else kept:
                                                              near 0 = nothing outside it does the task
    size          latents in C, in all and per layer
    stability     Jaccard overlap |C1 & C2| / |C1 | C2| of two circuits (from neighbouring lambdas,
                  or from two methods at the same size)

Both ratios come with a 95 % percentile-bootstrap interval over the pairs (each resample recomputes the
three means and the ratio), since a few dozen test pairs leave them uncertain.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline.circuit.methods import Lens
from pipeline.circuit.spliced import Batch

RESAMPLES = 1000  # bootstrap resamples of the pairs


class Ends(NamedTuple):
    """Per pair the two ends every circuit is placed between."""

    full: Tensor  # (P,) m(A) per pair: every latent kept (= the clean model)
    empty: Tensor  # (P,) every latent ablated, errors kept

    @property
    def gap(self) -> float:
        return float(self.full.mean() - self.empty.mean())

    @property
    def solved(self) -> float:
        """Share of the pairs whose clean logit difference is positive."""
        return float((self.full > 0).float().mean())


class Score(NamedTuple):
    """The measures of one circuit on one set of pairs."""

    size: int
    per_layer: dict[int, int]
    faithfulness: float
    completeness: float
    faithfulness_ci: tuple[float, float]  # 95 % bootstrap interval over the pairs
    completeness_ci: tuple[float, float]


@torch.no_grad()
def pair_ld(lens: Lens, parts: list[Batch], keep: list[Tensor] | None) -> Tensor:
    """(P,) the logit difference of every pair of ``parts`` with ``keep`` (None: all latents)."""
    return torch.cat([lens.ld(b, keep) for b in parts]).cpu()


def ends(lens: Lens, parts: list[Batch]) -> Ends:
    return Ends(pair_ld(lens, parts, None), pair_ld(lens, parts, [torch.zeros_like(k) for k in lens.ones()]))


def ratio(kept: Tensor, base: Ends) -> tuple[float, tuple[float, float]]:
    """(m(S) - m(empty)) / (m(A) - m(empty)) over the pairs, and its 95 % bootstrap interval."""
    top, bottom = (kept - base.empty).double().numpy(), (base.full - base.empty).double().numpy()  # (P,)
    picks = np.random.default_rng(27).integers(0, len(top), (RESAMPLES, len(top)))  # (R, P)
    resampled = top[picks].mean(1) / bottom[picks].mean(1)  # (R,)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return float(top.mean() / bottom.mean()), (float(low), float(high))


def measure(lens: Lens, parts: list[Batch], base: Ends, circuit: list[Tensor]) -> Score:
    """Faithfulness, completeness and size of ``circuit`` (per site, bool (N,)) on the pairs of ``parts``."""
    faithful, faithful_ci = ratio(pair_ld(lens, parts, [c.float() for c in circuit]), base)
    complete, complete_ci = ratio(pair_ld(lens, parts, [(~c).float() for c in circuit]), base)
    per_layer = {site.layer: int(c.sum()) for site, c in zip(lens.sites, circuit)}
    return Score(sum(per_layer.values()), per_layer, faithful, complete, faithful_ci, complete_ci)


def faithfulness(lens: Lens, parts: list[Batch], base: Ends, circuit: list[Tensor]) -> float:
    """Faithfulness alone (the validation pairs' number that chooses a circuit)."""
    return ratio(pair_ld(lens, parts, [c.float() for c in circuit]), base)[0]


def jaccard(a: list[Tensor], b: list[Tensor]) -> float:
    """|a & b| / |a | b| over all sites (1 for two empty circuits)."""
    both = sum(int((x & y).sum()) for x, y in zip(a, b))
    either = sum(int((x | y).sum()) for x, y in zip(a, b))
    return both / either if either else 1.0
