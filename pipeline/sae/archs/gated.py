"""The Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders"): whether a latent fires and how strongly are decided by two paths sharing W_enc.

    pi_gate = W_enc (x - b_dec) + b_enc                      (B, N) ``b_enc`` is SAELens's ``b_gate``
    pi_mag  = exp(r_mag) * (W_enc (x - b_dec)) + b_mag       the same GEMM, rescaled per latent
    z       = H(pi_gate) * ReLU(pi_mag)
    x_hat   = W_dec^T z + b_dec

H passes no gradient, so the gate learns from two terms of the loss besides the reconstruction: the
sparsity penalty sum_i ReLU(pi_gate)_i ||W_dec_i|| (ReluSAE.penalty), and the auxiliary reconstruction
||x - x_hat_frozen||^2 of ReLU(pi_gate) through a frozen copy of the decoder (the paper's L_aux: it trains
the gate to pick latents that reconstruct, without moving the decoder). All terms over ||x||^2
(pipeline.sae.archs.sparsity).

Decoder rows are kept at unit norm, as in the paper (SAELens lets them float and sends L_aux's gradient into
the decoder). With free rows and a frozen decoder in L_aux nothing holds a row's norm up: the penalty shrinks
it, the magnitude path (r_mag, b_mag) makes up the reconstruction, the frozen reconstruction from ReLU(pi_gate)
then needs larger gate pre-activations, which the penalty pushes back on. On the demo cache (1024 latents,
100k tokens) the mean row norm fell to 0.35 and FVU rose from 0.28 to 0.35 in the second half of the run.
With unit rows it fell to 0.20 (standard: 0.22). In training rows are renormalized plainly, as the paper and
TopK do (folding each step's norm growth from Adam's tangent steps into r_mag and b_mag measured 0.22);
outside training (finetune) the norms are folded in, so an imported SAE with free rows keeps its output.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from pipeline.sae.archs.relu import ReluSAE
from pipeline.sae.interface import LossTerm, SaeConfig, SaeOutput, register
from pipeline.sae.threshold import Code, Pattern, decode, per_entry


@register("gated", trainable=True)
class GatedSAE(ReluSAE):
    """SAELens ``gated``: a gate path (sign of ``pre``) times a magnitude path sharing W_enc's directions."""

    loss_names: ClassVar[tuple[str, ...]] = ("sparsity_loss", "dead_loss", "aux_recon_loss")
    unit_decoder: ClassVar[bool] = True

    def __init__(self, cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
        super().__init__(cfg, generator, device)
        self.r_mag = nn.Parameter(torch.zeros(cfg.n_latents, device=device))
        self.b_mag = nn.Parameter(torch.zeros(cfg.n_latents, device=device))

    def encoder_rows(self) -> tuple[Tensor, Tensor]:
        """W_enc (both paths read along its rows) and the magnitude path's bias b_mag, as SAEBench reads a gated
        SAE's encoder."""
        return self.W_enc.detach(), self.b_mag.detach()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit decoder rows. Outside training each row's norm n moves into its magnitude path, so x_hat stays
        as it was (an imported SAELens SAE's rows are free): z_i n = H(pi_gate) ReLU(e^(r_mag + log n) W_enc_i
        (x - b_dec) + n b_mag)."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)  # (N,)
        self.W_dec.div_(norms[:, None])
        if not self.training:
            self.r_mag.add_(norms.log())
            self.b_mag.mul_(norms)

    def activate(self, pre: Tensor, pattern: Pattern | None = None) -> Tensor:
        """H(pi_gate) ReLU(pi_mag), from pi_gate = ``pre``: the magnitude path's W_enc x is pre - b_gate."""
        scale, b_gate, b_mag = (per_entry(p, pattern) for p in (self.r_mag.exp(), self.b_enc, self.b_mag))
        return (pre > 0) * (scale * (pre - b_gate) + b_mag).relu()  # shaped as pre

    def penalized(self, code: Code) -> Tensor:
        """ReLU(pi_gate): its support is the gate's, the code's."""
        return code.pre.relu()

    def extra_terms(self, out: SaeOutput, code: Code, x_sq: Tensor) -> list[LossTerm]:
        """The auxiliary reconstruction of ReLU(pi_gate) through the frozen decoder, over ||x||^2."""
        frozen = decode(code.pre.relu(), code.pattern, self.W_dec.detach(), False) + self.b_dec.detach()  # (B, D)
        return [LossTerm("aux_recon_loss", 1.0, ((out.x - frozen).pow(2).sum(1) / x_sq).mean())]
