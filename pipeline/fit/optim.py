"""Optimizers and the learning-rate schedule of SAE training."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from schedulefree import ScheduleFreeWrapper
from torch import Tensor

from pipeline.fit.muon import MuonAdam


class Signum(torch.optim.Optimizer):
    """SignSGD with momentum: m = beta m + (1 - beta) g;  p -= lr sign(m). Momentum 0 is SignSGD, p -= lr sign(g),
    without a buffer."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, momentum: float = 0.9) -> None:
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
            directions = [p.grad for p in params]
            if group["momentum"]:
                buffers = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]
                torch._foreach_lerp_(buffers, directions, 1 - group["momentum"])  # noqa: SLF001 - fused foreach op
                directions = buffers
            signs = torch._foreach_sign(directions)  # noqa: SLF001
            torch._foreach_add_(params, signs, alpha=-group["lr"])  # noqa: SLF001
        return loss


REFERENCE_TOKENS = 800_000  # run length the size rule was fitted at (the demo: 2 epochs of the built-in corpus)
REFERENCE_BATCH = 4096  # tokens per step the size and length rules were fitted at
MUON_LR = 8e-3  # measured on the demo cache (auto_lr); sparsify keeps one Muon rate for every size too


def auto_lr(optimizer: str, n_latents: int, tokens: int, batch_size: int = REFERENCE_BATCH) -> float:
    """Default peak lr for a run of ``tokens`` training tokens in steps of ``batch_size``. Adam: 2e-3 x
    (16384 / latents) ** 0.65, never below 2e-3, times (800k / tokens) ** 0.25 for runs longer than 800k
    tokens, times sqrt(batch / 4096) for batches smaller than 4096; Signum and signum-sf: 5e-3 x
    sqrt(16384 / latents), sparsify's rule.

    Adam's rule is fitted to sweeps on the demo cache (SmolLM2 layer 12, k 32, every held-out row;
    benchmarks/recipe.py, RESULTS.md 07:35 and 2026-12-02): the lr with the best FVU that leaves under 1 % of
    latents silent on the 21k held-out tokens. At 0.8M tokens that is 1.2e-2 at 1024 latents (FVU 0.153),
    2e-3 at 16384 (0.111; 3e-3 gives 0.104 but 8 % silent there, mostly rare latents), and at 32768 lower
    rates starve latents: 1.4e-3 / 2e-3 leave 23.5 / 1.8 % silent on all training rows. At 4096 it gives
    4.9e-3, between 4e-3 (0.05 % silent, FVU 0.119) and 6e-3 (0.9 %, 0.115). The same rates are best at
    0.4M tokens. At 4M tokens the length factor's rates are: at 4096 latents 3.3e-3 leaves 0.2 % silent
    (4.9e-3: 1.6 %) at a 1 % higher FVU, at 16384 1.34e-3 leaves 0.9 % (2e-3: 3.2 %); at 1024 it costs
    0.5 % of FVU against 1.2e-2, with none silent either way. The batch factor is Adam's square-root
    scaling rule: at 16384 latents and 0.8M tokens it gives 1e-3 at batch 1024 and 5e-4 at 256, each with
    a better FVU than 2e-3 at 4096 (0.104 against 0.111) and a similar silent share (3.1 / 2.4 % against
    2.9 %); larger batches keep the measured rate. Signum is not re-measured. signum-sf, on a transcoder at
    4096 latents and 188k tokens (the 100k-token layer-12 cache, FVU over every training row): lr 5e-3 / 1e-2
    / 1.4e-2 / 2e-2 give 0.369 / 0.328 / 0.322 / 0.332, but the skip transcoder's best is the rule's 1e-2
    (0.252; 1.4e-2: 0.289), so the rule stays (benchmarks/RESULTS.md, 2026-12-04).

    Muon: 8e-3 at every size and length (MUON_LR), the best of a sweep at 4096 latents, 0.8M tokens (the
    demo's fit, every held-out row): lr 1e-3 / 2e-3 / 4e-3 / 8e-3 give FVU 0.209 / 0.154 / 0.127 / 0.116
    with 2.1 / 0.34 / 0.02 / 0.02 % of latents silent, against Adam at the demo's 6e-3: 0.115, 0.81 %.
    sparsify's default, 2e-3, which it keeps for every dictionary size, is too low for a run this short.
    Chosen again on all training rows (RESULTS.md 2026-12-04 15:30): 8e-3 / 1.2e-2 / 1.6e-2 / 2.4e-2 give
    training FVU 0.1108 / 0.1115 / 0.1161 / 0.1293, none / none / 0.1 / 1.3 % of latents silent on every
    training row. Other sizes are not measured.
    """
    if optimizer == "muon":
        return MUON_LR
    if optimizer == "adam":
        size = 2e-3 * max(1.0, 16384 / n_latents) ** 0.65
        length = min(1.0, REFERENCE_TOKENS / max(tokens, 1)) ** 0.25
        return size * length * min(1.0, batch_size / REFERENCE_BATCH) ** 0.5
    return 5e-3 * (16384 / n_latents) ** 0.5


def make_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    betas: tuple[float, float],
    device: torch.device,
    low_precision: bool = False,
) -> torch.optim.Optimizer:
    """Adam (fused kernel on CPU and CUDA), Signum, SignSGD in a schedule-free average (ScheduleFree), or Muon
    with Adam (MuonAdam) over parameter ``groups`` (the architecture's, SAE.param_groups), each given its peak
    rate as ``base_lr``, which the schedule scales. ``low_precision``: Muon orthogonalizes in bf16 (the
    hardware has it; selection.use_low_precision), else in float32."""
    groups = [{**group, "base_lr": group["lr"]} for group in groups]
    if name == "signum":  # names are checked once, by fit.config.Training
        return Signum(groups, lr=groups[0]["lr"], momentum=betas[0])
    if name == "signum-sf":  # the average's momentum takes the place of Signum's
        return ScheduleFree(Signum(groups, lr=groups[0]["lr"], momentum=0.0), momentum=SF_MOMENTUM)
    fused = device.type in ("cpu", "cuda")
    if name == "muon":
        return MuonAdam(groups, betas, fused, torch.bfloat16 if low_precision else torch.float32)
    return torch.optim.Adam(groups, lr=groups[0]["lr"], betas=betas, fused=fused)


# sparsify's (trainer.py); on the 100k-token layer-12 cache's transcoder (4096 latents, 188k tokens) it beat
# 0.9 by 0.003-0.005 of training-row FVU at lr 1.2e-2 to 1.7e-2 (benchmarks/RESULTS.md, 2026-12-04)
SF_MOMENTUM = 0.95


class ScheduleFree(ScheduleFreeWrapper):
    """Schedule-free averaging (Defazio et al. 2024) of a base optimizer, as sparsify trains with SignSGD: the
    ``schedulefree`` package's wrapper, whose base optimizer steps z, while the average x is a running mean of
    the z's weighted by lr_max^2 and the gradient is taken at y = momentum x + (1 - momentum) z. The parameters
    hold y while training; ``averaged`` puts them at x for what is saved or evaluated.

    ``state_dict`` adds each parameter's y to the base optimizer's state (z, the groups' step count and weight
    sum), so a checkpoint whose weights are x resumes at the same y bit for bit: y recomputed from x and z
    would round differently, and SignSGD's steps are the signs of gradients taken at y.
    """

    def __init__(self, base: torch.optim.Optimizer, momentum: float) -> None:
        super().__init__(base, momentum=momentum)
        self.train()  # step() refuses to run outside train mode

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]  # torch's state_dict numbering

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The parameters at x inside (the wrapper's own x: y.lerp(z, 1 - 1 / momentum)), back at y after."""
        training_point = [p.detach().clone() for p in self._params()]
        self.eval()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._params(), training_point)  # noqa: SLF001 - y exactly, not x.lerp(z)
            self.train_mode = True

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self.base.state_dict()
        slots = {pid: dict(own) for pid, own in state["state"].items()}  # torch's are the live dicts
        for pid, p in enumerate(self._params()):
            slots.setdefault(pid, {})["y"] = p.detach().clone()
        return {**state, "state": slots}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        own = {pid: dict(slots) for pid, slots in state_dict["state"].items()}
        with torch.no_grad():
            for pid, p in enumerate(self._params()):
                p.copy_(own[pid].pop("y"))
        self.base.load_state_dict({**state_dict, "state": {pid: s for pid, s in own.items() if s}})
        self.train_mode = True


def averaged(optimizer: torch.optim.Optimizer) -> AbstractContextManager[None]:
    """The parameters at the point to save or evaluate: the average of a schedule-free optimizer, else as they are."""
    return optimizer.averaged() if isinstance(optimizer, ScheduleFree) else nullcontext()


WARMUP_SHARE = 0.05  # of all steps, linear warmup from ~0
DECAY_SHARE = 0.2  # of all steps at the end, linear decay to 0 (warmup-decay only)


def lr_factor(step: int, total: int, schedule: str) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``total``.

    ``warmup-decay``: linear warmup over the first 5 % of steps, constant, then linear decay to zero over
    the last 20 %. ``constant``: the same warmup, then constant. ``reference``: the RouteSAE reference's
    schedule as its code computes it (see reference_factor).
    """
    if schedule == "reference":
        return reference_factor(step, total)
    warm = int(total * WARMUP_SHARE)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    decay_start = total - int(total * DECAY_SHARE)
    if step < decay_start:
        return 1.0
    return max(total - step, 0) / max(total - decay_start, 1)


def reference_factor(step: int, total: int) -> float:
    """The RouteSAE reference's multiplier at ``step`` (its LinearWarmupLR, src/utils.py), quirks kept so a
    comparison with the paper is like for like: warmup from 0 over W = int(0.05 total) steps (the first
    step has lr 0), constant until total - total // 5, then (total - step - W) / (total - W - total // 5),
    which drops at once to about 0.2 of the peak (not from 1) and reaches 0 at total - W, where it stays.
    """
    warm = int(total * WARMUP_SHARE)
    if step < warm:
        return step / max(1, warm)
    decay_start = total - total // 5
    if step < decay_start:
        return 1.0
    return max(0.0, (total - step - warm) / max(1, total - warm - total // 5))
