"""The TopK sparse autoencoder.

    z     = TopK_k( ReLU( W_enc (x - b_dec) + b_enc ) )      pre-bias b_dec subtracted first
    x_hat = W_dec^T z + b_dec                                 and added back after the decoder

Decoder rows (dictionary atoms, ``W_dec[i]``) have unit norm. Training uses the sparse kernels in
:mod:`pipeline.sae.kernels`; inference also accepts another ``k`` or a threshold ``theta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.infra.errors import UserError
from pipeline.sae.interface import REGISTRY, SAE, inference_only_archs, register
from pipeline.sae.kernels import Encoder, SparseDecode, TopKEncode


@dataclass
class SaeConfig:
    """Architecture of one SAE (the ``sae`` block of cfg.json)."""

    arch: str = "topk"  # topk | route | relu | jumprelu | gated (the last three: imported, inference only)
    d_in: int = 576  # input width: the model's hidden size
    n_latents: int = 4096  # dictionary size
    k: int = 32  # active latents per token (0 for the inference-only architectures)
    layers: list[int] = field(default_factory=list)  # model layer(s) read: [L] for topk, the routed range for route
    routing: str = "hard"  # route: hard (top layer times its weight) | soft (weighted sum of layers)
    aggregate: str = "sum"  # route: router input is the sum | mean of the routed layers

    def __post_init__(self) -> None:
        if self.arch not in REGISTRY:
            raise UserError(f"unknown architecture {self.arch!r}; use one of {', '.join(REGISTRY)}.")
        if self.arch in inference_only_archs():
            if self.k != 0:
                raise UserError(f"a {self.arch} SAE has no top-k: its k must be 0 (got {self.k}).")
        elif not 0 < self.k < self.n_latents:
            raise UserError(f"k={self.k} must be between 1 and the number of latents - 1 ({self.n_latents - 1}).")
        if self.routing not in ("hard", "soft") or self.aggregate not in ("sum", "mean"):
            raise UserError(f"routing must be hard|soft and aggregate sum|mean (got {self.routing}, {self.aggregate}).")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Latents(NamedTuple):
    """Sparse code of a batch: k (activation, latent id) pairs per token."""

    acts: Tensor  # (B, k) non-negative activations (zeros pad rows with fewer active latents)
    indices: Tensor  # (B, k) latent ids


def pack(code: Tensor, k: int | None = None, theta: float | None = None) -> Latents:
    """A dense non-negative code (B, N) as padded Latents: its entries above ``theta`` (if given), at most
    ``k`` per token (if given), as many columns as the busiest token needs (zeros pad the others)."""
    if theta is not None:
        code = code * (code > theta)  # (B, N)
    width = max(int((code > 0).sum(dim=1).max()), 1) if code.shape[0] else 1
    acts, indices = code.topk(min(width, k) if k else width, dim=-1)  # (B, width)
    return Latents(acts, indices)


class SaeOutput(NamedTuple):
    """Everything one forward computes."""

    x: Tensor  # (B, D) what was reconstructed (for RouteSAE, the routed input)
    x_hat: Tensor  # (B, D) reconstruction
    latents: Latents  # the sparse code
    layer_weights: Tensor | None  # (B, L) RouteSAE router softmax, else None
    layer_choice: Tensor | None  # (B,) RouteSAE hard routing: index into cfg.layers, else None


@register("topk", trainable=True)
class TopKSAE(SAE):
    """Encoder, decoder and biases of one TopK SAE."""

    def __init__(
        self, cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        bound = cfg.d_in**-0.5
        w_enc = (torch.rand(cfg.n_latents, cfg.d_in, generator=generator) * 2 - 1) * bound  # (N, D)
        self.W_enc = nn.Parameter(w_enc.to(device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents, device=device))
        self.W_dec = nn.Parameter((w_enc / w_enc.norm(dim=1, keepdim=True)).to(device))  # tied init, unit rows
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device))
        self.tangent_decoder_grad = False  # training sets it: W_dec gradients stay tangent to unit rows

    def encode(
        self, x: Tensor, k: int | None = None, theta: float | None = None, low_precision: bool = False
    ) -> Latents:
        """Top-k latents of ``x`` (B, D); with ``theta``, every latent whose activation exceeds it."""
        if theta is not None:
            return pack(torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t()).relu(), theta=theta)  # (B, N) in
        acts, indices = TopKEncode.apply(x, self.W_enc, self.b_enc, self.b_dec, k or self.cfg.k, low_precision)
        return Latents(acts, indices)

    def encode_chosen(self, x: Tensor, chosen: Tensor) -> Latents:
        """The latents ``chosen`` (B, k) for ``x`` by a top-k selection shared with other SAEs
        (kernels.select_topk), with their exact activations."""
        acts, indices = TopKEncode.apply(x, self.W_enc, self.b_enc, self.b_dec, chosen.shape[1], False, chosen)
        return Latents(acts, indices)

    def dense_code(self, x: Tensor) -> Tensor:
        """The top-k code of ``x`` (M, D) as a dense (M, N) tensor, differentiable in x."""
        pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t()).relu()  # (M, N)
        acts, indices = pre.topk(self.cfg.k, dim=-1)  # (M, k)
        return torch.zeros_like(pre).scatter(-1, indices, acts)

    def directions(self, latents: Sequence[int] | Tensor | None = None) -> Tensor:
        """Decoder rows (F, D): each latent's unit write direction."""
        if latents is None:
            return self.W_dec
        return self.W_dec[torch.as_tensor(latents, dtype=torch.long, device=self.W_dec.device)]  # [] too

    def encoder(self) -> Encoder:
        """What a shared top-k selection needs of this SAE."""
        return Encoder(self.W_enc.detach(), self.b_enc.detach(), self.b_dec.detach(), self.cfg.k)

    def decode(self, latents: Latents) -> Tensor:
        """Reconstruction (B, D) from a sparse code."""
        return SparseDecode.apply(latents.acts, latents.indices, self.W_dec, self.tangent_decoder_grad) + self.b_dec

    def forward(
        self,
        x: Tensor,
        k: int | None = None,
        theta: float | None = None,
        low_precision: bool = False,
        chosen: Tensor | None = None,
    ) -> SaeOutput:
        latents = self.encode(x, k, theta, low_precision) if chosen is None else self.encode_chosen(x, chosen)
        return SaeOutput(x, self.decode(latents), latents, None, None)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
