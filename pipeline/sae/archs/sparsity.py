"""What the threshold SAEs (standard, jumprelu, gated) share in training: the sparsity penalty's
coefficient (fixed and warmed up, or steered to a target L0), the data-dependent start that puts
every latent at the target firing rate, and the loss that brings dead latents back.

Scale convention. Every term is a per-token quantity divided by ``||x||^2``, as the normalized MSE is:

    loss = mean_tokens (||x - x_hat||^2 + c * penalty(x)) / ||x||^2

so at the input scale the published coefficients were fitted at, ``c`` is the published coefficient:
Anthropic's April 2024 update and SAELens (``StandardTrainingSAE``: ``l1_coefficient * sum_i z_i ||W_dec_i||``
added to the summed squared error, inputs scaled to ``||x|| ~ sqrt(d)`` as sae-pipe's standardized caches
are); for JumpReLU, SAELens's ``l0_coefficient`` at that scale (Rajamanoharan et al. 2024's lambda is
fitted at ``E||x||^2 = 1``: multiply it by d).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from pipeline.infra.errors import UserError
from pipeline.sae.interface import Knobs, Step

# The automatic coefficient: a PI controller driven by e = log(batch mean L0 / k), clipped to [-1, 1] so one
# odd batch cannot throw it, acting on u = log(c) (signed: c = scale x start x sinh(u)). The proportional
# term answers at once; the integral gain (Tuning.gain_i) bounds how far u moves in a step.
GAIN_P = 1.0
# Anti-windup by conditional integration (Astrom & Hagglund, "Advanced PID Control", 2006, on integrator
# windup): the integral stands still while L0 is already on its way to the target. The plant saturates:
# Adam moves each weight by about lr a step whatever the size of its gradient, so once the penalty rules the
# gradients a larger coefficient moves L0 no faster. The integral would go on growing all the way (on the
# demo cache JumpReLU's coefficient reached -931 while L0 climbed from 18 to 25) and, at the target, need as
# many steps to unwind as it took to wind, overshooting meanwhile. The usual remedies clamp or back-calculate
# against the actuator's limit; this one has no known limit (it lies wherever the penalty starts to
# dominate, which depends on data, width and lr), so the saturation is read off the plant instead: an L0
# approaching the target says the present coefficient suffices. Once L0 stalls short of the target,
# integration resumes, so the steady state still has no offset. A creep counts as a stall (Tuning.stall): an
# approach far slower than the fastest one seen is the plant near its balance, not saturated, and waiting it out
# costs the run's end (standard at target 128 on the demo cache crept from L0 100 to 118 over its last 150 steps,
# integrating on a quarter of them).
TREND_RATE = 0.1  # per step: the recent gap averages ~10 batches, so batch noise does not pass for progress
HOLD_STEPS = 30  # the longest hold through the start (Tuning.hold); the leap it waits out lasts ~15 steps
HOLD_BAND = 0.1  # |log(L0 / k)| beyond which L0 has left the target, for the hold


@dataclass(frozen=True)
class Tuning:
    """The controller's tuning to the plant it drives: how fast the penalty moves L0 and what disturbs it."""

    gain_i: float  # integral gain: u moves by at most this a step
    horizon: int  # the error is the gap this many steps ahead on the recent trend (0: the present gap)
    scale: float  # signed: c = scale x start x sinh(u), linear (crossing zero fast) for |c| < scale x start
    hold: bool  # only the proportional term acts until L0 first comes back from its leap away from the start
    stall: float = 0.0  # an approach slower than this share of the fastest one seen integrates, as a stall does


# Standard and gated: the penalty reaches the encoder biases, and L0 follows the coefficient within a few
# steps (k = 32, 92 steps on the cache below: held-out L0 29.5 and 31.0). JumpReLU's tuning made standard's
# L0 swing between 13 and 38 to the end of the run (FVU 0.149 -> 0.182). stall 0.1, on the demo cache (802,816
# tokens, 4096 latents), standard's held-out L0 at targets 16 / 32 / 64 / 128: 15.4 / 31.3 / 63.0 / 119.4
# without, 15.5 / 31.6 / 63.7 / 127.8 with (FVU at 128: 0.0892 -> 0.0874; benchmarks/RESULTS.md, 2026-12-05).
BIASES = Tuning(gain_i=0.15, horizon=0, scale=1.0, hold=False, stall=0.1)
# JumpReLU: the penalty reaches only the thresholds, which Adam moves by a few lr a step (jumprelu.THRESHOLD_LR),
# while the encoder, trained by the reconstruction alone, keeps lowering the pre-activations. L0 falls easily
# and climbs back slowly, so the controller must not let it fall past the target. On a 100k-token SmolLM2-135M
# layer-12 cache at k = 32, after 46 / 92 / 185 steps (2 / 4 / 8 epochs), held-out L0 and FVU were 21.7 / 18.1
# / 21.2 and 0.176 / 0.143 / 0.113 with the BIASES tuning and the thresholds at the lr; they are 32.3 / 34.2 /
# 33.8 and 0.160 / 0.119 / 0.100 with this tuning (and the thresholds at 3x). Three measures:
# - hold: Adam's first steps move the encoder so far that L0 leaps from 32 to ~75 within 3 steps and falls
#   back by step ~15, at any coefficient (identically at a fixed -30 and -300). Integrating the leap wound
#   the coefficient to +3.4 (+90 with this tuning otherwise: 2 epochs ended at L0 24.8, not 32.3), and that
#   coefficient then drove L0 down past the target.
# - horizon 30 (a lead, about three times the lag of Adam's momentum): L0 falling fast towards the target
#   reads as already past it, so the integral unwinds and the coefficient turns negative before L0 arrives
#   instead of after; an approach too slow to arrive within the horizon still integrates. At 20 L0 climbed
#   back past the target further (4 epochs: 35.0 and 35.4 on two seeds, against 34.2 and 34.4).
# - scale 10, gain 0.3: from the +2..+10 of the start to the -30..-60 that holds L0 up is 5.5-8 units of u
#   at scale 1, 2-3.5 at scale 10, and gain 0.3 covers them in half the steps (at scale 1 and gain 0.15 the
#   coefficient took 34 steps just to cross zero, while L0 fell 11 below the target).
THRESHOLDS = Tuning(gain_i=0.3, horizon=30, scale=10.0, hold=True)


class SparsityControl:
    """The sparsity penalty's coefficient during training.

    ``coeff > 0``: fixed, warmed up linearly from 0 over the first ``warmup`` share of the run (SAELens's
    ``l1_warm_up_steps``, as a share). ``coeff == 0`` (auto): adapted every step so the batch mean L0 meets
    ``target``; no warm-up, since the controller itself starts from ``start`` and a warm-up factor would
    only make it wind up. Its state (``state()``, saved with a resumable run) is a few floats, identical on
    every rank (fed the ranks' mean L0).

    ``signed``: the controller acts on u with c = scale x start x sinh(u) instead of c = exp(u). For large u
    the two agree (a step of u scales c by e^step), but sinh crosses zero, so c can turn negative and reward
    firing. JumpReLU needs that: its reconstruction alone already prefers a sparse code (on SmolLM2 at layer
    12, with the penalty at 1e-6, the L0 of a k = 32 target fell to 14 and stayed), so a target above that
    L0 is out of reach of any positive coefficient. Only a bounded penalty may be signed: JumpReLU's L0 is
    at most N, while a negative L1 (standard, gated) would reward unbounded activations.

    ``anti_windup``: integrate only while L0 is not yet approaching the target (see TREND_RATE) or creeps
    towards it (Tuning.stall), and hold through the start where ``tuning`` says; off, the plain PI controller
    on the present gap.
    """

    def __init__(self, start: float, signed: bool = False, anti_windup: bool = True, tuning: Tuning = BIASES):
        self.start = start  # the auto coefficient's first value (the published one at our scale)
        self.signed = signed
        self.anti_windup = anti_windup
        self.tuning = tuning
        # the controller's integral part, in u
        self.integral = math.asinh(1 / tuning.scale) if signed else math.log(start)
        self.u = self.integral  # what the penalty's weight is a function of now
        self.recent: float | None = None  # the recent batches' log(L0 / k), averaged at TREND_RATE
        self.updates = 0  # controller steps taken
        self.leap = 0.0  # the side (+1 above, -1 below) L0 first left the target to; 0 while it has not
        self.held = float(anti_windup and tuning.hold)  # 1 while the hold through the start lasts
        self.fastest = 0.0  # the fastest approach to the target seen, in log L0 a step

    def coeff(self, knobs: Knobs, step: Step) -> float:
        """The penalty's weight this step."""
        if knobs.sparsity_coeff > 0:
            ramp = min(1.0, step.progress / knobs.sparsity_warmup) if knobs.sparsity_warmup > 0 else 1.0
            return knobs.sparsity_coeff * ramp
        return self.tuning.scale * self.start * math.sinh(self.u) if self.signed else math.exp(self.u)

    def update(self, l0: float, target: int) -> None:
        """One controller step after a batch whose mean L0 (over all ranks) was ``l0``."""
        gap = math.log(max(l0, 1e-3) / target)  # > 0: too many latents fire
        if self.held:
            self.release(gap)
        speed = self.speed(gap)
        self.fastest = max(self.fastest, speed)
        approaching = speed > self.tuning.stall * self.fastest  # a creep slower than that integrates as a stall
        # no lead while held: the trend is then the leap's, which the coefficient did not make
        error = max(-1.0, min(1.0, self.ahead(gap) if self.anti_windup and not self.held else gap))
        if not (self.held or (self.anti_windup and approaching and error * gap > 0)):
            self.integral += self.tuning.gain_i * error
        self.u = self.integral + GAIN_P * error
        self.recent = gap if self.recent is None else self.recent + TREND_RATE * (gap - self.recent)
        self.updates += 1

    def ahead(self, gap: float) -> float:
        """The gap ``tuning.horizon`` steps ahead on the recent trend (the recent average lags a steady trend
        by 1 / TREND_RATE steps of it)."""
        return gap if self.recent is None else gap + self.tuning.horizon * TREND_RATE * (gap - self.recent)

    def release(self, gap: float) -> None:
        """End the hold through the start once L0, having left the target, is back at it (or across it), or
        after HOLD_STEPS updates; at once if it did not start at the target (there is no leap to wait out)."""
        if not self.leap and abs(gap) > HOLD_BAND:
            self.leap = math.copysign(1.0, gap)
        back = self.leap and gap * self.leap <= 0
        if back or self.updates >= HOLD_STEPS or (self.updates == 0 and self.leap):
            self.held = 0.0

    def speed(self, gap: float) -> float:
        """How fast L0 approaches the target, in log L0 a step: this batch's ``gap`` on the side of the recent
        ones, nearer the target than their average (which lags a steady trend by 1 / TREND_RATE steps). 0 while
        it does not approach: a batch across the target is not on its way, and the integral unwinds."""
        if self.recent is None or gap * self.recent <= 0:
            return 0.0
        return max(0.0, TREND_RATE * (abs(self.recent) - abs(gap)))

    def state(self) -> dict[str, float]:
        """What a resumed run needs to go on exactly as an uninterrupted one."""
        state = {"integral": self.integral, "u": self.u, "updates": float(self.updates), "leap": self.leap}
        state |= {"held": self.held, "fastest": self.fastest}
        return state | ({} if self.recent is None else {"recent": self.recent})

    def load(self, state: dict[str, float]) -> None:
        """Take up the controller where ``state()`` left it (a state saved without one leaves it as it is)."""
        self.integral = state.get("integral", self.integral)
        self.u = state.get("u", self.u)
        self.recent = state.get("recent", self.recent)
        self.updates = int(state.get("updates", self.updates))
        self.leap = state.get("leap", self.leap)
        self.held = state.get("held", self.held)
        self.fastest = state.get("fastest", self.fastest)


def check_target(k: int, knobs: Knobs) -> None:
    """The automatic coefficient needs a target L0."""
    if knobs.sparsity_coeff == 0 and k < 1:
        raise UserError(
            "--sparsity-coeff 0 adjusts the penalty to meet the target L0 --k, but --k is 0; "
            "give a target L0 with --k or a fixed coefficient with --sparsity-coeff."
        )


def firing_quantile(pre: Tensor, k: int, step: Step) -> Tensor:
    """Per latent (N,), the pre-activation that ``k / N`` of the batch ``pre`` (B, N) exceeds: a threshold
    there makes every latent fire at the mean rate of a code with L0 = k, so training starts at the target
    L0 with no latent dead. The ranks' quantiles are averaged, so all ranks start alike."""
    rows, n = pre.shape
    rank = min(rows, max(1, round(rows * (1 - k / n))))  # kthvalue is 1-based
    return step.average(pre.kthvalue(rank, dim=0).values)  # (N,)


def dead_pre_act_loss(
    columns: Callable[[Tensor], Tensor], floor: Tensor | float, scale: Tensor | float, step: Step, x_sq: Tensor
) -> Tensor:
    """Dead latents' pre-activation loss: per token, sum over dead latents i of ReLU(floor_i - pre_i) x
    scale_i (the decoder row norm), over ||x||^2, mean over tokens. ``columns`` gives the pre-activations
    (B, n_dead) of the dead latents' ids (n_dead,): only theirs are computed.

    Anthropic's pre-activation loss (Circuits Updates, January 2025), which SAELens's JumpReLU trainer
    (``calculate_pre_act_loss``) applies to dead latents only, as here. A latent whose pre-activation never
    reaches its threshold gets no gradient from the reconstruction; this raises it towards the threshold
    on every token, most on those nearest, until it fires and the reconstruction takes over. AuxK does not
    serve: it reads ReLU'd pre-activations, which a dead ReLU latent has none of.
    """
    dead = step.dead.nonzero().squeeze(1)  # (n_dead,)
    if len(dead) == 0:
        return x_sq.new_zeros(())
    floor = floor[dead] if isinstance(floor, Tensor) else floor
    scale = scale[dead] if isinstance(scale, Tensor) else scale
    below = (floor - columns(dead)).relu() * scale  # (B, n_dead)
    return (below.sum(1) / x_sq).mean()
