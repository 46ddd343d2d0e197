"""Transcoders: a TopK code of an MLP's input that reconstructs the MLP's output (Dunefsky et al., 2024).

    z     = TopK_k( ReLU( W_enc x_in + b_enc ) )          no pre-bias: input and output are different spaces
    y_hat = W_dec^T z + b_dec  (+ W_skip x_in)              b_dec is the output's bias; W_skip: skip transcoder

b_enc starts at -mean(x_in) W_enc^T, so the pre-activations start centred, as sparsify's trainer starts them;
decoder rows start from the first batch's outputs (``start``).

``x_in`` is the cache's ``mlp_in`` site and the target ``y`` its ``mlp_out`` (pipeline.llm.sites), read as
a pair of the same tokens. Decoder rows keep unit norm as in the TopK SAE, so a latent's write direction
into the residual stream is its decoder row. The skip path (Paulo et al., 2025) starts at zero, as in
sparsify. Training reuses the TopK SAE's kernels, AuxK and revive unchanged.

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
from pipeline.sae.kernels import sparse_t_matmul


@register("transcoder", trainable=True)
class Transcoder(TopKSAE):
    """A TopK transcoder from an MLP's input to its output, with an optional linear skip path."""

    multi_layer = True  # its input is the (B, 2, D) pair (mlp_in, mlp_out) of one layer
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

    def output(self, x: Tensor, latents: Latents) -> Tensor:
        """The decoder's output (B, D) plus the skip path of the input ``x`` (B, D), where there is one."""
        y_hat = self.decode(latents)
        return y_hat if self.W_skip is None else y_hat + x @ self.W_skip.t()

    def forward(
        self,
        x: Tensor,
        k: int | None = None,
        theta: float | None = None,
        low_precision: bool = False,
        chosen: Tensor | None = None,
    ) -> SaeOutput:
        """``x`` is the pair (B, 2, D): the MLP's input and the output to reconstruct."""
        x_in, target = x[:, 0], x[:, 1]  # (B, D) each
        latents = self.code(x_in, k, theta, low_precision, chosen)
        return SaeOutput(target, self.output(x_in, latents), latents, None, None, x_in)

    def reconstruct(self, out: SaeOutput, latents: Latents) -> Tensor:
        return self.output(out.encoded, latents)  # out.encoded: the MLP's input

    @torch.no_grad()
    def start(self, x: Tensor, step: Step) -> None:
        """Data-dependent start from the first batch: b_dec at the mean MLP output, b_enc centring the
        pre-activations, and each decoder row pointing where its latent's tokens' outputs lie.

        Centring: without a pre-bias the encoder sees the MLP's input uncentred, and after the pre-MLP
        norm's weight a few channels carry a large value of the same sign on every token, so each latent's
        pre-activation is mostly a constant; b_enc = -mean(x_in) W_enc^T removes it.
        Decoder rows: a transcoder's decoder writes into another space than its encoder reads, so a tied
        start gives each chosen latent a random output direction, and on about half of its tokens the first
        gradients push its activation down and out of the top k for good. sparsify starts the decoder at zero,
        which unit rows exclude; here row i starts where the first gradient step from a zero decoder would
        take it: the activation-weighted sum of the centred outputs of the batch's tokens where latent i
        fires (rows of latents that do not fire keep their random start). SmolLM2 layer 12, 4096 latents, k
        32, 188k tokens: dead share in training 77 % (centred alone) -> 20 %, FVU 0.490 -> 0.367.
        """
        x_in, target = x[:, 0], x[:, 1]  # (B, D) each
        mean_out = step.average(target.mean(dim=0))  # (D,)
        self.b_dec.copy_(mean_out)
        self.b_enc.copy_(-step.average(x_in.mean(dim=0)) @ self.W_enc.t())  # (N,)
        code = self.encode(x_in)
        rows = step.average(sparse_t_matmul(code.indices, code.acts, self.cfg.n_latents, target - mean_out))  # (N, D)
        norms = rows.norm(dim=1, keepdim=True)  # (N, 1)
        fired = norms.squeeze(1) > 0  # (N,)
        self.W_dec[fired] = rows[fired] / norms[fired]


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
