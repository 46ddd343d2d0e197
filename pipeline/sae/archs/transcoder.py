"""Transcoders: a TopK code of an MLP's input that reconstructs the MLP's output (Dunefsky et al., 2024).

    z     = TopK_k( ReLU( W_enc x_in + b_enc ) )          no pre-bias: input and output are different spaces
    y_hat = W_dec^T z + b_dec  (+ W_skip x_in)              b_dec is the output's bias; W_skip: skip transcoder

b_enc starts at -mean(x_in) W_enc^T, so the pre-activations start centred, and the decoder at zero, as
sparsify's trainer starts them (``start``).

``x_in`` is the cache's ``mlp_in`` site and the target ``y`` its ``mlp_out`` (pipeline.llm.sites), read as
a pair of the same tokens. Decoder rows are free, as in sparsify's transcoders: neither renormalized nor
given tangent gradients (see ``start`` for why), so a latent's write direction into the residual stream is
its decoder row, norm included, as for the sparsify transcoders ``sae-pipe import`` reads. The skip path
(Paulo et al., 2025) starts at zero, as in sparsify. Training reuses the TopK SAE's kernels, AuxK and revive.

SAELens's ReLU and JumpReLU transcoders (pipeline.interop.transcoding imports them) are the same map with the
ReLU or JumpReLU code of relu.py / jumprelu.py in place of the TopK, without a pre-bias: inference only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.sae.archs.jumprelu import JumpReluSAE
from pipeline.sae.archs.relu import ReluSAE
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import Latents, SaeConfig, SaeOutput, Step, register
from pipeline.sae.selection import Selection


@register("transcoder", trainable=True)
class Transcoder(TopKSAE):
    """A TopK transcoder from an MLP's input to its output, with an optional linear skip path."""

    multi_layer = True  # its input is the (B, 2, D) pair (mlp_in, mlp_out) of one layer
    unit_decoder = False  # free rows (see start), as sparsify's and the imported transcoders'
    sites = ("mlp_in", "mlp_out")

    def __init__(
        self, cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__(cfg, generator, device)
        self.no_pre_bias: Tensor
        self.register_buffer("no_pre_bias", torch.zeros(cfg.d_in, device=device), persistent=False)
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in, device=device)) if cfg.skip else None  # (D, D)

    @property
    def pre_bias(self) -> Tensor:
        return self.no_pre_bias

    def output(self, x: Tensor, latents: Latents, low_precision: bool = False) -> Tensor:
        """The decoder's output (B, D) plus the skip path of the input ``x`` (B, D), where there is one
        (``low_precision``: the decode and W_dec's gradient from bf16 operands)."""
        y_hat = self.decode(latents, low_precision)
        return y_hat if self.W_skip is None else y_hat + x @ self.W_skip.t()

    def forward(
        self,
        x: Tensor,
        k: int | None = None,
        theta: float | None = None,
        low_precision: bool = False,
        chosen: Selection | None = None,
    ) -> SaeOutput:
        """``x`` is the pair (B, 2, D): the MLP's input and the output to reconstruct."""
        x_in, target = x[:, 0], x[:, 1]  # (B, D) each
        latents = self.code(x_in, k, theta, low_precision, chosen)
        return SaeOutput(target, self.output(x_in, latents, low_precision), latents, None, None, x_in)

    def reconstruct(self, out: SaeOutput, latents: Latents) -> Tensor:
        return self.output(out.encoded, latents)  # out.encoded: the MLP's input

    @torch.no_grad()
    def start(self, x: Tensor, step: Step) -> None:
        """Data-dependent start from the first batch: b_dec at the mean MLP output, b_enc centring the
        pre-activations, and the decoder at zero.

        Centring: without a pre-bias the encoder sees the MLP's input uncentred, and after the pre-MLP
        norm's weight a few channels carry a large value of the same sign on every token (SmolLM2 layer 12:
        channel 247 at -12 in the cache's units, the mean's norm 14 against a spread of 19), so each latent's
        pre-activation is mostly a constant; b_enc = -mean(x_in) W_enc^T removes it.
        Zero decoder: that mean is still in every token's input, so an Adam step on W_enc moves a latent's
        pre-activation on all tokens at once, by up to lr |mean(x_in)|_1, far more than its bias step. With
        unit decoder rows (any start: tied, or pointed at the first batch's outputs) the encoder takes the
        full reconstruction error's gradient from the first step, and the latents it first pushes down
        leave the top k for good within 2-3 steps: 20 % of latents were dead in training at SmolLM2 layer
        12 (4096 latents, k 32, 188k tokens), with AuxK unable to raise them (its loss stayed at 1.00). From
        zero, free rows first grow towards their latents' outputs while the encoder's gradient, which
        scales with them, is small; dead share 20 % -> 3.4 % and training FVU 0.367 -> 0.357 there.
        """
        x_in, target = x[:, 0], x[:, 1]  # (B, D) each
        self.b_dec.copy_(step.average(target.mean(dim=0)))
        self.b_enc.copy_(-step.average(x_in.mean(dim=0)) @ self.W_enc.t())  # (N,)
        self.W_dec.zero_()


@register("relu_transcoder")
class ReluTranscoder(Transcoder, ReluSAE):
    """SAELens's ``transcoder`` / ``skip_transcoder`` (imported; not trained here): z = ReLU(W_enc x_in + b_enc),
    y_hat = W_dec^T z + b_dec (+ W_skip x_in)."""

    def pre_acts(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x, self.W_enc.t())  # (B, N): no pre-bias, as every transcoder here


@register("jumprelu_transcoder")
class JumpReluTranscoder(ReluTranscoder, JumpReluSAE):
    """SAELens's ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder`` (imported; not trained here): a latent
    fires only above its own threshold, z_i = pre_i H(pre_i - threshold_i)."""
