"""Linear probes for the absorption and probing suites: binary logistic regression fitted in torch
(full-batch L-BFGS, class-balanced, a small L2 penalty), the features a k-sparse probe may read, and the
scores SAEBench reports (accuracy, F1 of ``score > 0``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

L2 = 1e-4  # weight decay on the standardized inputs: keeps separable tasks from diverging
STEPS = 200  # L-BFGS iterations


class Probe(NamedTuple):
    """``score(x) = x @ weight + bias``; positive means the class."""

    weight: Tensor  # (D,) in the space of the inputs it was fitted on
    bias: Tensor  # ()

    def score(self, x: Tensor) -> Tensor:
        return x.double() @ self.weight + self.bias  # (M,)


def fit_probe(x: Tensor, y: Tensor, l2: float = L2, steps: int = STEPS) -> Probe:
    """Logistic regression of ``y`` (M,) bool on ``x`` (M, D), each class weighted to half the loss (as
    scikit-learn's ``class_weight="balanced"``, which SAEBench uses)."""
    x, target = x.double(), y.double()  # (M, D), (M,)
    n_pos = float(target.sum())
    if n_pos in (0.0, float(len(target))):  # one class only: a constant probe
        return Probe(torch.zeros(x.shape[1], dtype=torch.float64), torch.tensor(1.0 if n_pos else -1.0).double())
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)  # (D,): standardized, L-BFGS converges fast
    z = (x - mean) / std  # (M, D)
    weights = torch.where(target > 0, len(target) / (2 * n_pos), len(target) / (2 * (len(target) - n_pos)))  # (M,)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target, weights)
        value = value + l2 * w.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    w_x = w.detach() / std  # back to the space of x
    return Probe(w_x, b.detach() - (w_x * mean).sum())


def top_by_difference(x: Tensor, y: Tensor, k: int) -> Tensor:
    """The ``k`` columns of ``x`` (M, D) whose means on the positives ``y`` (M,) bool and on the rest differ
    most, in absolute value (SAEBench's sparse probing)."""
    x = x.double()
    return (x[y].mean(0) - x[~y].mean(0)).abs().topk(min(k, x.shape[1])).indices  # (k,)


def accuracy(probe: Probe, x: Tensor, y: Tensor) -> float:
    """Share of rows whose sign of score matches ``y``."""
    return float(((probe.score(x) > 0) == y).double().mean())


def f1(predicted: Tensor, y: Tensor) -> float:
    """F1 of the bool predictions (M,) against ``y`` (M,): 2 TP / (2 TP + FP + FN), 0 when both are empty."""
    tp = float((predicted & y).sum())
    wrong = float((predicted ^ y).sum())
    return 2 * tp / (2 * tp + wrong) if tp else 0.0
