"""Inference-only SAEs imported from SAELens: ReLU ("standard"), JumpReLU and Gated.

They share the TopK SAE's parameters and its linear decoder, ``x_hat = W_dec^T z + b_dec``, and
differ only in how the code z is computed (``pre = W_enc (x - b_dec) + b_enc``):

    relu       z = ReLU(pre)
    jumprelu   z = ReLU(pre) * [pre > threshold]               (a learned threshold per latent)
    gated      z = [pre > 0] * ReLU(W_mag (x - b_dec) + b_mag)  W_mag = exp(r_mag) * W_enc row-wise;
               ``b_enc`` is the gate bias (SAELens ``b_gate``)

Because decoding is the TopK SAE's, every stage that splices, edits or tabulates a TopK SAE takes
these as they are; `encode` returns the same padded ``Latents``. They are never trained here
(`fit` refuses them); an inference ``k`` keeps the k largest latents, ``theta`` a threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import Latents, SaeConfig, pack, register


@register("relu")
class ReluSAE(TopKSAE):
    """SAELens ``standard``: a ReLU encoder."""

    top_k = False

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations (B, N)."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t())

    def code(self, x: Tensor) -> Tensor:
        """The dense code z (B, N)."""
        return self.pre_acts(x).relu()

    def encode(
        self, x: Tensor, k: int | None = None, theta: float | None = None, low_precision: bool = False
    ) -> Latents:
        """Every active latent of ``x`` (B, D) (or its k largest, or those above ``theta``)."""
        return pack(self.code(x), k, theta)

    def dense_code(self, x: Tensor) -> Tensor:
        return self.code(x)


@register("jumprelu")
class JumpReluSAE(ReluSAE):
    """SAELens ``jumprelu``: a latent fires only above its own threshold."""

    def __init__(self, cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
        super().__init__(cfg, generator, device)
        self.threshold = nn.Parameter(torch.zeros(cfg.n_latents, device=device))

    def code(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)  # (B, N)
        return pre.relu() * (pre > self.threshold)


@register("gated")
class GatedSAE(ReluSAE):
    """SAELens ``gated``: a gate path (sign of ``pre``) times a magnitude path sharing W_enc's directions."""

    def __init__(self, cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
        super().__init__(cfg, generator, device)
        self.r_mag = nn.Parameter(torch.zeros(cfg.n_latents, device=device))
        self.b_mag = nn.Parameter(torch.zeros(cfg.n_latents, device=device))

    def code(self, x: Tensor) -> Tensor:
        centered = x - self.b_dec  # (B, D)
        gate = torch.addmm(self.b_enc, centered, self.W_enc.t()) > 0  # (B, N)
        w_mag = self.W_enc * self.r_mag.exp()[:, None]  # (N, D)
        return gate * torch.addmm(self.b_mag, centered, w_mag.t()).relu()
