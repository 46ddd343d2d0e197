"""The standard SAE: a ReLU encoder trained with an L1 penalty, the base of the threshold SAEs.

    pre   = W_enc (x - b_dec) + b_enc                          (B, N)
    z     = ReLU(pre)
    x_hat = W_dec^T z + b_dec

Trained as SAELens's ``StandardTrainingSAE`` (sae_lens/saes/standard_sae.py, ``calculate_aux_loss``) and
Anthropic's April 2024 update: decoder rows are free and the penalty is ``sum_i z_i ||W_dec_i||`` (so
shrinking z by growing W_dec buys nothing), its coefficient warmed up linearly (Cunningham et al. 2023
train the same ReLU code with a plain L1 and unit decoder rows). Scale and coefficient: see
:mod:`pipeline.sae.archs.sparsity`. ``k`` is the target L0, not a top-k: ``--sparsity-coeff 0`` steers
the coefficient until the batch mean L0 meets it.

SAELens's ``standard`` SAEs brought in by `sae-pipe import` carry the name ``relu`` (as runs imported
before training existed do); a trained one carries ``standard``. Both are this class.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from pipeline.sae.archs.sparsity import (
    BIASES,
    SparsityControl,
    Tuning,
    check_target,
    dead_pre_act_loss,
    firing_quantile,
)
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import Knobs, Latents, LossTerm, SaeConfig, SaeOutput, Step, pack, register
from pipeline.sae.selection import Selection
from pipeline.sae.threshold import (
    Code,
    Pattern,
    SparsePre,
    candidates,
    dead_columns,
    decode,
    padded,
    per_entry,
    token_sums,
)


@register("relu")
@register("standard", trainable=True)
class ReluSAE(TopKSAE):
    """SAELens ``standard``: a ReLU encoder; the base of the threshold SAEs (jumprelu, gated)."""

    top_k = False
    loss_names: ClassVar[tuple[str, ...]] = ("sparsity_loss", "dead_loss")  # type: ignore[assignment]  # TopK: tuple[str]
    start_coeff: ClassVar[float] = 5.0  # the automatic coefficient's first value: Anthropic's / SAELens's L1
    unit_decoder: ClassVar[bool] = False  # free decoder rows (Standard's L1 penalty reads their norms)
    signed_penalty: ClassVar[bool] = False  # the automatic coefficient may turn negative (sparsity.SparsityControl)
    control_tuning: ClassVar[Tuning] = BIASES  # the automatic coefficient's tuning to how this penalty moves L0

    def __init__(self, cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
        super().__init__(cfg, generator, device)
        self.control = SparsityControl(self.start_coeff, self.signed_penalty, tuning=self.control_tuning)
        self.pre: Code | Tensor | None = None  # the last training forward's code, for the loss (a Tensor: dense)
        self.coeff_now = 0.0  # the penalty's weight in the last step (log.csv)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations (B, N): W_enc (x - b_dec) + b_enc. In training b_dec is folded into the bias,
        so its gradient is one product with W_enc, not a (B, N) x (N, D) GEMM (x needs none there)."""
        if self.training:
            return torch.addmm(torch.addmv(self.b_enc, self.W_enc, self.b_dec, alpha=-1), x, self.W_enc.t())
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t())

    def activate(self, pre: Tensor, pattern: Pattern | None = None) -> Tensor:
        """The code z from the pre-activations: dense (B, N), or (E,) at the entries of ``pattern``."""
        return pre.relu()

    def encode(
        self, x: Tensor, k: int | None = None, theta: float | None = None, low_precision: bool = False
    ) -> Latents:
        """Every active latent of ``x`` (B, D) (or its k largest, or those above ``theta``)."""
        return pack(self.activate(self.pre_acts(x)), k, theta)

    def dense_code(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_acts(x))

    def forward(
        self,
        x: Tensor,
        k: int | None = None,
        theta: float | None = None,
        low_precision: bool = False,
        chosen: Selection | None = None,
    ) -> SaeOutput:
        if not self.training or k is not None or theta is not None:
            latents = pack(self.activate(self.pre_acts(x)), k, theta)  # as wide as the busiest token
            return SaeOutput(x, self.decode(latents), latents, None, None)
        self.pre = code = self.training_code(x, low_precision)
        x_hat = decode(code.acts, code.pattern, self.W_dec, self.tangent_decoder_grad, low_precision) + self.b_dec
        return SaeOutput(x, x_hat, padded(code.acts, code.pattern), None, None)

    def training_code(self, x: Tensor, low_precision: bool) -> Code:
        """The code of a training batch: its entries above the floor (pipeline.sae.threshold), or dense (B, N)
        tensors where they are too many for the sparse kernels to pay."""
        floor = self.selection_floor()  # (N,)
        found = candidates(x, self.W_enc.detach(), self.b_enc.detach(), self.b_dec.detach(), floor, low_precision)
        if found is None:
            pre = self.pre_acts(x)  # (B, N)
            return Code(pre, self.activate(pre), None)
        pre, *entries = SparsePre.apply(x, self.W_enc, self.b_enc, self.b_dec, floor, found, low_precision)
        pattern = Pattern(*entries)
        return Code(pre, self.activate(pre, pattern), pattern)

    def selection_floor(self) -> Tensor:
        """Per latent (N,), the pre-activation above which an entry takes part in training: 0, the ReLU's."""
        return self.b_enc.new_zeros(self.cfg.n_latents)

    # --- training hooks (pipeline.sae.interface.SAE) ---

    def prepare_training(self, knobs: Knobs) -> None:
        check_target(self.cfg.k, knobs)
        self.tangent_decoder_grad = self.unit_decoder

    @torch.no_grad()
    def start(self, x: Tensor, step: Step) -> None:
        """b_dec at the data mean (as TopK); with a target L0, each latent's firing point at the pre-activation
        that k / N of the batch exceeds (see sparsity.firing_quantile)."""
        super().start(x, step)
        if self.cfg.k > 0:
            self.set_firing_point(firing_quantile(self.pre_acts(x), self.cfg.k, step))

    def set_firing_point(self, quantile: Tensor) -> None:
        """Make each latent fire where its pre-activation exceeds ``quantile`` (N,)."""
        self.b_enc.sub_(quantile)

    def shared_encoder(self) -> None:  # type: ignore[override]  # TopK's returns its encoder
        return None  # a threshold code selects its own latents

    def loss_terms(self, out: SaeOutput, step: Step, knobs: Knobs) -> list[LossTerm]:
        code = self.last_code()
        x_sq = out.x.pow(2).sum(1).clamp_min(1e-12)  # (B,)
        norms = self.W_dec.norm(dim=1)  # (N,) in the graph: growing a row does not shrink the penalty
        if self.unit_decoder:  # rows held at 1: a gradient along them would only be renormalized away
            norms = norms.detach()
        self.coeff_now = self.control.coeff(knobs, step)
        return [
            LossTerm("sparsity_loss", self.coeff_now, self.penalty(code, norms, x_sq)),
            LossTerm("dead_loss", knobs.aux_alpha, self.dead_loss(out.x, norms.detach(), step, x_sq)),
            *self.extra_terms(out, code, x_sq),
        ]

    def last_code(self) -> Code:
        """The last training forward's code (a dense pre-activation tensor set by hand counts as that code)."""
        assert self.pre is not None, "loss_terms follows a training forward"
        return self.pre if isinstance(self.pre, Code) else Code(self.pre, self.activate(self.pre), None)

    def penalty(self, code: Code | None, norms: Tensor, x_sq: Tensor) -> Tensor:
        """The sparsity penalty: mean over tokens of sum_i p_i ||W_dec_i|| / ||x||^2, p the penalized code
        (z itself; gated: the gate's ReLU'd pre-activations)."""
        code = self.last_code() if code is None else code
        weighed = self.penalized(code) * per_entry(norms, code.pattern)
        return (token_sums(weighed, code.pattern) / x_sq).mean()

    def penalized(self, code: Code) -> Tensor:
        """What the L1 penalty weighs, aligned with the code's entries: z itself."""
        return code.acts

    def dead_loss(self, x: Tensor, norms: Tensor, step: Step, x_sq: Tensor) -> Tensor:
        """Dead latents' pre-activations pulled up to their floor (0: where ReLU starts passing them)."""
        columns = partial(dead_columns, x, self.W_enc, self.b_enc, self.b_dec)  # a GEMM of their rows only
        return dead_pre_act_loss(columns, self.dead_floor(), norms, step, x_sq)

    def dead_floor(self) -> Tensor | float:
        """Where a dead latent's pre-activation is pulled up to."""
        return 0.0

    def extra_terms(self, out: SaeOutput, code: Code, x_sq: Tensor) -> list[LossTerm]:
        """Terms an architecture adds besides its penalty and the dead latents' loss (gated's auxiliary one)."""
        return []

    def after_step(self, out: SaeOutput, step: Step, knobs: Knobs) -> None:
        self.pre = None
        self.normalize_decoder()
        if knobs.sparsity_coeff == 0:
            l0 = (out.latents.acts > 0).sum(1).float().mean().reshape(1)  # (1,)
            self.control.update(float(step.average(l0)), self.cfg.k)

    def step_metrics(self, out: SaeOutput) -> dict[str, float]:
        return {"sparsity_coeff": self.coeff_now}

    def log_fields(self) -> list[str]:
        return ["sparsity_coeff"]

    def training_state(self) -> dict[str, float]:
        return self.control.state()

    def load_training_state(self, state: dict[str, float]) -> None:
        self.control.load(state)
