"""Reconstruction quality, one definition each, shared by the training log and `evaluate`.

  nmse  mean over tokens of ||x - x_hat||^2 / ||x||^2      (the RouteSAE NormMSE)
  fvu   sum ||x - x_hat||^2 / sum ||x - mean(x)||^2        (fraction of variance unexplained)

Both are kept as additive sums so that a metric over many batches equals the metric over all rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Reconstruction:
    """Running sums of one SAE's reconstruction error over the rows seen so far.

    The sums stay tensors on the SAE's device (float64), so adding a batch never waits for the device;
    reading :attr:`nmse` or :attr:`fvu` does.
    """

    nmse_sum: Tensor | float = 0.0  # sum over rows of ||x - x_hat||^2 / ||x||^2
    err_sum: Tensor | float = 0.0  # sum over rows of ||x - x_hat||^2
    x_sum: Tensor | float = 0.0  # (D,) sum of the rows
    x2_sum: Tensor | float = 0.0  # sum over rows of ||x||^2
    rows: int = 0

    def add(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """Add a batch (B, D); return its mean NMSE as a tensor that keeps its gradient (the training loss)."""
        err = SquaredError.apply(x, x_hat)  # (B,)
        x_sq = torch.linalg.vector_norm(x, dim=-1).square()  # (B,) one pass (vecdot is a product, then a sum)
        nmse = err / x_sq.clamp_min(1e-12)  # (B,)
        with torch.no_grad():
            self.x_sum = self.x_sum + x.sum(0).double()
            self.nmse_sum = self.nmse_sum + nmse.sum().double()
            self.err_sum = self.err_sum + err.sum().double()
            self.x2_sum = self.x2_sum + x_sq.sum().double()
            self.rows += len(x)
        return nmse.mean()

    @property
    def nmse(self) -> float:
        return float(self.nmse_sum) / max(self.rows, 1)

    @property
    def fvu(self) -> float:
        """sum ||x - mean||^2 = sum ||x||^2 - ||sum x||^2 / n, so no centered copy is made."""
        if self.rows == 0:
            return float("nan")
        variance = float(self.x2_sum) - float(torch.as_tensor(self.x_sum).square().sum()) / self.rows
        return float(self.err_sum) / max(variance, 1e-12)


class SquaredError(torch.autograd.Function):
    """||x_hat - x||^2 of each row (B,) of two (B, D) tensors, in two passes over them forward and one back.

    Written out by torch's ops (a difference, a square, a row sum, and a square's and a difference's gradient)
    it takes six passes over (B, D) tensors, which at a training step's sizes live in memory, not in cache.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, x_hat: Tensor) -> Tensor:  # noqa: ANN401
        diff = x_hat - x  # (B, D)
        ctx.save_for_backward(diff)
        return torch.linalg.vector_norm(diff, dim=-1).square()  # (B,)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # noqa: ANN401
        (diff,) = ctx.saved_tensors
        grad_x_hat = diff * (2 * grad)[:, None]  # (B, D)
        return (-grad_x_hat if ctx.needs_input_grad[0] else None), grad_x_hat
