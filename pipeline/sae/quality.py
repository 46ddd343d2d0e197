"""Reconstruction quality, one definition each, shared by the training log and `evaluate`.

  nmse  mean over tokens of ||x - x_hat||^2 / ||x||^2      (the RouteSAE NormMSE)
  fvu   sum ||x - x_hat||^2 / sum ||x - mean(x)||^2        (fraction of variance unexplained)

Both are kept as additive sums so that a metric over many batches equals the metric over all rows.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        err = (x - x_hat).pow(2).sum(-1)  # (B,)
        x_sq = x.pow(2).sum(-1)  # (B,)
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
