"""Muon for SAE training: torch's Muon with its orthogonalization in a chosen precision, and Adam beside it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

RMS_MATCH = 0.2  # Moonshot's factor: lr x 0.2 sqrt(max(rows, cols)) gives the update an AdamW step's RMS


def orthogonalized(
    g: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> Tensor:
    """U S' V^T for g = U S V^T (2-D), S' near 1: ``steps`` quintic Newton-Schulz iterations in ``dtype``.

    Each iteration maps every singular value s to a s + b s^3 + c s^5, which pushes values in (0, 1] towards
    1 without an SVD; the Frobenius norm scaling first puts them all in (0, 1]. Iterating on the wide
    orientation keeps the Gram matrix the small one, (min, min).
    """
    a, b, c = coefficients
    wide = g.shape[0] <= g.shape[1]
    x = (g if wide else g.t()).to(dtype)  # (m, n), m <= n
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.t()  # (m, m)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return x if wide else x.t()


class Muon(torch.optim.Muon):
    """torch.optim.Muon (Nesterov momentum 0.95, decoupled weight decay 0.1, Moonshot's step size) with the
    Newton-Schulz iterations in ``ns_dtype``, where torch's always run in bf16.

    bf16 is the right choice where the hardware multiplies in it (CUDA, CPUs with AMX or AVX512-BF16), and a
    trap elsewhere: a CPU without them emulates bf16 matrix products, and the orthogonalization of one of the
    demo's 4096 x 576 matrices took 47 s on such a (loaded) 2-core EPYC, against 0.8 s in float32. The momentum
    buffers are torch's own (``momentum_buffer``), so checkpoints written before this class load unchanged.
    """

    def __init__(self, params: list[dict[str, Any]], lr: float, ns_dtype: torch.dtype) -> None:
        super().__init__(params, lr=lr, adjust_lr_fn="match_rms_adamw")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor] = []
            self._init_group(group, params, grads, buffers)
            beta = group["momentum"]
            for p, g, buf in zip(params, grads, buffers, strict=True):
                buf.lerp_(g, 1 - beta)
                direction = g.lerp(buf, beta) if group["nesterov"] else buf  # Nesterov: look ahead along buf
                update = orthogonalized(
                    direction, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                )
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"] * RMS_MATCH * max(p.shape) ** 0.5)
        return loss


class MuonAdam(torch.optim.Optimizer):
    """Muon (:class:`Muon`) on the SAE's weight matrices, Adam on the rest, as one optimizer.

    Muon is defined for matrices only: it steps along the orthogonalized Nesterov momentum U V^T (five
    Newton-Schulz iterations) of each matrix. The split is sparsify's (trainer.py: Muon for every
    parameter with ndim >= 2, torch.optim.Adam for the rest at the same lr), and so is the step size: lr x
    0.2 sqrt(max(rows, cols)) (its muon.py; torch's ``adjust_lr_fn="match_rms_adamw"``, Moonshot's rule
    that gives the update the RMS of an AdamW step), with momentum 0.95 and decoupled weight decay 0.1
    (the default of both). Only the first group (the SAE's own parameters) goes to Muon: a RouteSAE's
    router maps to one logit per layer, a classifier head, which Muon's author leaves to AdamW
    (kellerjordan.github.io/posts/muon), and its rate was measured for Adam.

    ``param_groups`` lists Muon's groups, then Adam's (the router first), each with its ``base_lr`` so the
    schedule scales all of them; ``state_dict`` numbers the parameters across both, so a checkpoint holds
    one optimizer state.
    """

    def __init__(
        self, groups: list[dict[str, Any]], betas: tuple[float, float], fused: bool, ns_dtype: torch.dtype
    ) -> None:
        first, *others = groups
        matrices = [p for p in first["params"] if p.ndim == 2]
        rest = [p for p in first["params"] if p.ndim != 2]
        self.parts: list[torch.optim.Optimizer] = [Muon([{**first, "params": matrices}], first["lr"], ns_dtype)]
        adam_groups = [g for g in [*others, {**first, "params": rest}] if g["params"]]
        if adam_groups:
            self.parts.append(torch.optim.Adam(adam_groups, lr=first["lr"], betas=betas, fused=fused))
        super().__init__([p for g in groups for p in g["params"]], {})
        self.param_groups = [g for part in self.parts for g in part.param_groups]  # the parts' own dicts

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = self.parts[0].step(closure)  # Muon's; the closure runs once
        for part in self.parts[1:]:
            part.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The parts' states as one torch state_dict: parameter ids run on from one part to the next."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for part in self.parts:
            own = part.state_dict()
            state.update({offset + pid: slots for pid, slots in own["state"].items()})
            groups += [{**g, "params": [offset + pid for pid in g["params"]]} for g in own["param_groups"]]
            offset += sum(len(g["params"]) for g in own["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Give each part its share of a state_dict written by ``state_dict``."""
        first_group = offset = 0
        for part in self.parts:
            groups = state_dict["param_groups"][first_group : first_group + len(part.param_groups)]
            count = sum(len(g["params"]) for g in groups)
            part.load_state_dict(
                {
                    "state": {pid - offset: s for pid, s in state_dict["state"].items() if 0 <= pid - offset < count},
                    "param_groups": [{**g, "params": [pid - offset for pid in g["params"]]} for g in groups],
                }
            )
            first_group, offset = first_group + len(groups), offset + count
        self.param_groups = [g for part in self.parts for g in part.param_groups]  # loading made new dicts
