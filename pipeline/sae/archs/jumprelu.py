"""The JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): a latent fires only above its own
learned threshold, and the penalty counts the latents that fire (L0).

    pre   = W_enc (x - b_dec) + b_enc                       (B, N)
    theta = exp(log_threshold)                               (N,) positive by construction
    z     = pre * H(pre - theta)                             H: the Heaviside step
    x_hat = W_dec^T z + b_dec                                decoder rows at unit norm, as TopK's

H has no useful derivative, so theta learns through the paper's straight-through estimator: with the
rectangle kernel K(u) = 1 for |u| < 1/2 and a bandwidth eps,

    d z_i / d theta_i     := -(theta_i / eps) K((pre_i - theta_i) / eps)      (the jump's height, smeared)
    d H_i / d theta_i     := -(1 / eps) K((pre_i - theta_i) / eps)           (the L0 penalty's)
    d z_i / d pre_i       =  H(pre_i - theta_i);  d H_i / d pre_i := 0

and d / d log_threshold = theta x d / d theta. The penalty is the L0 of each token over ||x||^2
(pipeline.sae.archs.sparsity), on dead latents the pre-activation loss with floor theta.

SAELens 6 stores ``threshold`` itself; the state dict does too (``threshold = exp(log_threshold)``), so
SAELens files import and export as they are. ``log_threshold`` is kept in float64: a float32 threshold
goes to its log and back bit for bit (an import then export gives the same bytes), which a float32 log
cannot promise.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pipeline.sae.archs.relu import ReluSAE
from pipeline.sae.archs.sparsity import THRESHOLDS, Tuning
from pipeline.sae.interface import Knobs, SaeConfig, register
from pipeline.sae.threshold import Code, Pattern, per_entry, token_sums

# Auto bandwidth: the paper's eps = 0.001 is set for inputs of unit mean squared norm; sae-pipe's
# standardized rows have ||x|| ~ sqrt(d), so the same kernel, relative to the pre-activations' scale, is
# 0.001 x sqrt(d) (0.024 at d = 576). At d = 2304 (Gemma 2 2B) that is SAELens's default 0.05.
BANDWIDTH_PER_NORM = 0.001
THRESHOLD_FLOOR = 1e-3  # the smallest starting threshold: log(0) is not a parameter
# Under the automatic coefficient the thresholds train at THRESHOLD_LR x the lr, so that the controller can
# move L0. Adam moves log_threshold by about lr a step however strong the penalty, while the encoder, trained
# by the reconstruction alone, lowers the pre-activations faster: on SmolLM2-135M at layer 12 (k = 32, 92
# steps) L0 ended at 28.3 with the coefficient held at -30 from the first step and at 28.4 at -300, so no
# controller could keep it at 32. At 10x, -300 drove L0 to 580, and under the controller L0 swung between 17
# and 63 while 10.7 % of the latents died; at 3x the controller (sparsity.THRESHOLDS) lands held-out L0 at
# 32.3 / 34.2 / 33.8 after 46 / 92 / 185 steps, with 1.7-2.1 % of the latents dead.
THRESHOLD_LR = 3.0


class JumpFn(torch.autograd.Function):
    """z = pre * H(pre - exp(log_theta)), the threshold's gradient by the straight-through estimator.

    Elementwise: ``log_theta`` is (N,) for a dense ``pre`` (B, N), or one per entry of a flat code (E,)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, log_theta: Tensor, eps: float) -> Tensor:  # noqa: ANN401
        theta = log_theta.exp().to(pre.dtype)  # (N,)
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)  # (B, N)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # noqa: ANN401
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.eps / 2).to(grad.dtype)  # (B, N) K((pre - theta) / eps)
        d_theta = -(theta / ctx.eps) * (window * grad).sum_to_size(theta.shape)  # (N,)
        return grad * (pre > theta), (d_theta * theta).double(), None


class StepFn(torch.autograd.Function):
    """H(pre - exp(log_theta)), with the straight-through gradient to the threshold only."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, log_theta: Tensor, eps: float) -> Tensor:  # noqa: ANN401
        theta = log_theta.exp().to(pre.dtype)  # (N,)
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)  # (B, N)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:  # noqa: ANN401
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.eps / 2).to(grad.dtype)  # (B, N)
        return None, (-(theta / ctx.eps) * (window * grad).sum_to_size(theta.shape)).double(), None  # d / d log_theta


@register("jumprelu", trainable=True)
class JumpReluSAE(ReluSAE):
    """SAELens ``jumprelu``: a latent fires only above its own threshold."""

    start_coeff: ClassVar[float] = 1.0  # SAELens's l0_coefficient default
    unit_decoder: ClassVar[bool] = True
    signed_penalty: ClassVar[bool] = True  # L0 is bounded: a negative coefficient may pull L0 up to the target
    control_tuning: ClassVar[Tuning] = THRESHOLDS  # the penalty moves only the thresholds: see THRESHOLDS

    def __init__(self, cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
        super().__init__(cfg, generator, device)
        start = torch.full((cfg.n_latents,), math.log(THRESHOLD_FLOOR), dtype=torch.float64, device=device)
        self.log_threshold = nn.Parameter(start)  # (N,) float64: see the module's doc
        self.bandwidth = BANDWIDTH_PER_NORM * math.sqrt(cfg.d_in)
        self.register_state_dict_post_hook(_threshold_out)
        self.register_load_state_dict_pre_hook(_threshold_in)

    @property
    def threshold(self) -> Tensor:
        """Each latent's threshold (N,)."""
        return self.log_threshold.exp().to(self.W_enc.dtype)

    def activate(self, pre: Tensor, pattern: Pattern | None = None) -> Tensor:
        if self.training:
            return JumpFn.apply(pre, per_entry(self.log_threshold, pattern), self.bandwidth)  # type: ignore[no-any-return]
        return pre * (pre > self.threshold)

    def selection_floor(self) -> Tensor:
        """The bottom of the straight-through window, theta - eps / 2: the estimator needs d loss / d z of the
        latents just below their thresholds too (z = 0 there). 2^-16 (theta + eps) lower, so float32 rounding
        of the window's test (pre - theta, ~2^-24 of it) cannot drop an entry at its edge."""
        theta = self.log_threshold.detach().exp()  # (N,) float64
        return (theta - self.bandwidth / 2 - 2.0**-16 * (theta + self.bandwidth)).to(self.W_enc.dtype)

    def prepare_training(self, knobs: Knobs) -> None:
        super().prepare_training(knobs)
        self.bandwidth = knobs.bandwidth or BANDWIDTH_PER_NORM * math.sqrt(self.cfg.d_in)

    def param_groups(self, knobs: Knobs) -> list[dict[str, Any]]:
        """The thresholds in a group of their own at THRESHOLD_LR x the lr under the automatic coefficient;
        with a fixed one, every parameter at the lr (as SAELens trains them)."""
        if knobs.sparsity_coeff > 0:
            return super().param_groups(knobs)
        rest = [param for name, param in self.named_parameters() if name != "log_threshold"]
        return [{"params": rest, "lr": knobs.lr}, {"params": [self.log_threshold], "lr": THRESHOLD_LR * knobs.lr}]

    def set_firing_point(self, quantile: Tensor) -> None:
        self.log_threshold.copy_(quantile.double().clamp_min(THRESHOLD_FLOOR).log())

    def penalty(self, code: Code | None, norms: Tensor, x_sq: Tensor) -> Tensor:
        """Mean over tokens of L0 / ||x||^2, through the straight-through step."""
        code = self.last_code() if code is None else code
        fired = StepFn.apply(code.pre, per_entry(self.log_threshold, code.pattern), self.bandwidth)  # as pre
        return (token_sums(fired, code.pattern) / x_sq).mean()

    def dead_floor(self) -> Tensor:
        return self.threshold.detach()


def _threshold_out(module: nn.Module, state: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:  # noqa: ANN401
    """State dicts carry ``threshold`` (SAELens's name and meaning), not its log."""
    log_threshold = state.pop(prefix + "log_threshold")
    state[prefix + "threshold"] = log_threshold.exp().to(state[prefix + "W_enc"].dtype)


def _threshold_in(module: nn.Module, state: dict[str, Tensor], prefix: str, *args: Any) -> None:  # noqa: ANN401
    """A loaded ``threshold`` becomes ``log_threshold``. SAELens's code is ReLU(pre) x H(pre - threshold), so a
    threshold at or below 0 acts as 0, which becomes -inf here: the same ReLU."""
    if prefix + "threshold" in state:
        state[prefix + "log_threshold"] = state.pop(prefix + "threshold").double().clamp_min(0).log()
