"""Optimizers and the learning-rate schedule of SAE training."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


class Signum(torch.optim.Optimizer):
    """SignSGD with momentum: m = beta m + (1 - beta) g;  p -= lr sign(m)."""

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            buffers = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]
            grads = [p.grad for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])  # noqa: SLF001 - fused foreach op
            signs = torch._foreach_sign(buffers)  # noqa: SLF001
            torch._foreach_add_(params, signs, alpha=-group["lr"])  # noqa: SLF001
        return loss


def auto_lr(optimizer: str, n_latents: int) -> float:
    """Default peak lr: 2e-3 (Adam) or 5e-3 (Signum) at 16384 latents, times sqrt(16384 / latents).

    Adam, measured on the demo cache (SmolLM2 layer 12, k 32, 0.8M tokens, benchmarks/recipe.py): at
    4096 latents 2e-3 / 4e-3 / 8e-3 leave 0.3 / 1.4-2.1 / 13 % of latents silent on the 21k held-out
    tokens at FVU 0.134 / 0.119 / 0.116; at 16384, 1e-3 / 2e-3 / 4e-3 give 3.1 / 6.6 / 29 % at FVU
    0.133 / 0.111 / 0.101. The default takes the middle: a few tenths of FVU for 4-8x fewer dead
    latents (the old 4e-3 base sat at the right-hand column). Those shares were taken with the old dead
    threshold; with 64 x latents / k (fit/plan.py) 4096 latents at 4e-3 / 6e-3 leave 0.02-0.05 / 0.7-0.9 %
    at FVU 0.119 / 0.115, and 16384 at 2e-3 / 3e-3 leave 2.9 / 8.0 %. Signum's base is not re-measured.
    """
    base = 2e-3 if optimizer == "adam" else 5e-3
    return base * (16384 / n_latents) ** 0.5


def make_optimizer(
    name: str, model: nn.Module, lr: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.Optimizer:
    """Adam (fused kernel on CPU and CUDA) or Signum."""
    if name == "signum":  # names are checked once, by fit.config.Training
        return Signum(model.parameters(), lr=lr, momentum=betas[0])
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, fused=device.type in ("cpu", "cuda"))


WARMUP_SHARE = 0.05  # of all steps, linear warmup from ~0
DECAY_SHARE = 0.2  # of all steps at the end, linear decay to 0 (warmup-decay only)


def lr_factor(step: int, total: int, schedule: str) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``total``.

    ``warmup-decay`` (the RouteSAE schedule): linear warmup over the first 5 % of steps, constant,
    then linear decay to zero over the last 20 %. ``constant``: the same warmup, then constant.
    """
    warm = int(total * WARMUP_SHARE)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    decay_start = total - int(total * DECAY_SHARE)
    if step < decay_start:
        return 1.0
    return max(total - step, 0) / max(total - decay_start, 1)
