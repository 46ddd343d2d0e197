"""The TopK sparse autoencoder.

    z     = TopK_k( ReLU( W_enc (x - b_dec) + b_enc ) )      pre-bias b_dec subtracted first
    x_hat = W_dec^T z + b_dec                                 and added back after the decoder

Decoder rows (dictionary atoms, ``W_dec[i]``) have unit norm. Training uses the sparse kernels in
:mod:`pipeline.sae.kernels`; inference also accepts another ``k`` or a threshold ``theta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.sae.auxk_kernels import aux_decode
from pipeline.sae.interface import SAE, Knobs, Latents, LossTerm, SaeConfig, SaeOutput, Step, pack, register
from pipeline.sae.kernels import SparseDecode, TopKEncode
from pipeline.sae.quality import Reconstruction
from pipeline.sae.selection import Encoder, Selection, ordered_bits

REFERENCE_RENORM = 100  # the RouteSAE reference renormalizes decoder rows every 100 batches (its --steps)
# multi-TopK (sparsify's multi_topk): the code at 4k also reconstructs, its loss weighted 1/8 as in sparsify's
# trainer (loss = fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8), so one SAE serves k up to 4k. Both codes
# come from one selection of the top 4k, as in sparsify (TopKSAE.multi_code): one encoder GEMM a step
MULTI_TOPK_FACTOR, MULTI_TOPK_WEIGHT = 4, 1 / 8


@register("topk", trainable=True)
class TopKSAE(SAE):
    """Encoder, decoder and biases of one TopK SAE."""

    loss_names = ("aux_loss",)
    unit_decoder: ClassVar[bool] = True  # decoder rows kept at unit norm while training (False: free rows)

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
        self.multi_topk = False  # training sets it: also train the code at MULTI_TOPK_FACTOR x k
        self.wide: tuple[Latents, Latents] | None = None  # multi-TopK: the last forward's k code, its 4k code's others

    def encode(
        self, x: Tensor, k: int | None = None, theta: float | None = None, low_precision: bool = False
    ) -> Latents:
        """Top-k latents of ``x`` (B, D); with ``theta``, every latent whose activation exceeds it."""
        if theta is not None:
            return pack(torch.addmm(self.b_enc, x - self.pre_bias, self.W_enc.t()).relu(), theta=theta)  # (B, N) in
        acts, indices = TopKEncode.apply(x, self.W_enc, self.b_enc, self.pre_bias, k or self.cfg.k, low_precision)
        return Latents(acts, indices)

    def encode_chosen(self, x: Tensor, chosen: Selection, low_precision: bool = False) -> Latents:
        """The latents ``chosen`` for ``x`` by a top-k selection shared with other SAEs (selection.select_topk),
        with the activations it found (``low_precision``: W_enc's gradient from bf16)."""
        k = chosen.indices.shape[1]
        acts, indices = TopKEncode.apply(x, self.W_enc, self.b_enc, self.pre_bias, k, low_precision, chosen)
        return Latents(acts, indices)

    def dense_code(self, x: Tensor) -> Tensor:
        """The top-k code of ``x`` (M, D) as a dense (M, N) tensor, differentiable in x."""
        pre = torch.addmm(self.b_enc, x - self.pre_bias, self.W_enc.t()).relu()  # (M, N)
        acts, indices = pre.topk(self.cfg.k, dim=-1)  # (M, k)
        return torch.zeros_like(pre).scatter(-1, indices, acts)

    def encoder_rows(self) -> tuple[Tensor, Tensor]:
        return self.W_enc.detach(), self.b_enc.detach()

    def directions(self, latents: Sequence[int] | Tensor | None = None) -> Tensor:
        """Decoder rows (F, D): each latent's unit write direction."""
        if latents is None:
            return self.W_dec
        return self.W_dec[torch.as_tensor(latents, dtype=torch.long, device=self.W_dec.device)]  # [] too

    @property
    def pre_bias(self) -> Tensor:
        """What the encoder subtracts from its input first: b_dec, the data's center (a transcoder: nothing)."""
        return self.b_dec

    def encoder(self) -> Encoder:
        """What a shared top-k selection needs of this SAE."""
        return Encoder(self.W_enc.detach(), self.b_enc.detach(), self.pre_bias.detach(), self.cfg.k)

    def decode(self, latents: Latents, low_precision: bool = False) -> Tensor:
        """Reconstruction (B, D) from a sparse code (``low_precision``: it and W_dec's gradient from bf16)."""
        return self.decode_rows(latents, low_precision) + self.b_dec

    def decode_rows(self, latents: Latents, low_precision: bool) -> Tensor:
        """The code's weighted sum of decoder rows (B, D), without b_dec."""
        entries = (latents.indices, self.W_dec, self.tangent_decoder_grad, None, None, low_precision)
        return SparseDecode.apply(latents.acts, *entries)  # type: ignore[no-any-return]

    def forward(
        self,
        x: Tensor,
        k: int | None = None,
        theta: float | None = None,
        low_precision: bool = False,
        chosen: Selection | None = None,
    ) -> SaeOutput:
        """The code at ``k`` (:meth:`code`) and its reconstruction."""
        latents = self.code(x, k, theta, low_precision, chosen)
        return SaeOutput(x, self.decode(latents, low_precision), latents, None, None)

    def code(
        self, x: Tensor, k: int | None, theta: float | None, low_precision: bool, chosen: Selection | None
    ) -> Latents:
        """The forward's code of ``x`` at ``k`` (default cfg.k; or above ``theta``, or the latents ``chosen``); a
        multi-TopK training step's code at cfg.k comes from its selection at 4k (:meth:`multi_code`)."""
        if self.trains_wide and k is None and theta is None:
            return self.multi_code(x, low_precision, chosen)
        if chosen is None:
            return self.encode(x, k, theta, low_precision)
        return self.encode_chosen(x, chosen, low_precision)

    @property
    def trains_wide(self) -> bool:
        """Whether a training step selects the top MULTI_TOPK_FACTOR x k latents (multi-TopK), not the top k."""
        return self.training and self.multi_topk

    @property
    def wide_k(self) -> int:
        """The multi-TopK code's latents per token: MULTI_TOPK_FACTOR x k, at most every latent."""
        return min(MULTI_TOPK_FACTOR * self.cfg.k, self.cfg.n_latents)

    def multi_code(self, x: Tensor, low_precision: bool, chosen: Selection | None) -> Latents:
        """The top-k code of ``x`` taken from one selection of its top 4k (``chosen`` at 4k by a sweep's shared
        GEMM: shared_encoder asks for 4k); the other 3k entries are kept (in ``wide``) for loss_terms.

        The k largest of the top 4k are the top k (ties aside, which swap only equal values or zeros), so the
        encoder GEMM runs once a step as in sparsify, not once per code; both codes' values are gathers of the
        4k code's, so TopKEncode's backward gets the gradients of both losses summed.
        """
        wide = self.code(x, self.wide_k, None, low_precision, chosen)
        top = ordered_bits(wide.acts.detach()).topk(self.cfg.k, dim=1, sorted=False).indices  # (B, k) in the 4k code
        outside = torch.ones_like(wide.indices, dtype=torch.bool).scatter_(1, top, False)  # (B, 4k)
        rest = outside.nonzero()[:, 1].view(len(x), -1)  # (B, 3k) the other places, row by row
        latents, others = (Latents(wide.acts.gather(1, at), wide.indices.gather(1, at)) for at in (top, rest))
        self.wide = (latents, others)
        return latents

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (nothing where they are free)."""
        if self.unit_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # --- training hooks (pipeline.sae.interface.SAE) ---

    def prepare_training(self, knobs: Knobs) -> None:
        # sae-pipe keeps decoder rows on the unit sphere every step (tangent gradients + renormalization);
        # the reference recipe lets them drift and renormalizes every REFERENCE_RENORM steps, as its code does
        self.tangent_decoder_grad = self.unit_decoder and knobs.recipe != "reference"
        self.multi_topk = knobs.multi_topk

    @torch.no_grad()
    def start(self, x: Tensor, step: Step) -> None:
        """b_dec starts at the data mean of the first batch (the geometric center of the inputs), the same
        on every rank: the mean of the ranks' first batches."""
        self.b_dec.copy_(step.average(x.mean(dim=0)))

    def shared_encoder(self) -> Encoder | None:
        """The encoder at k, or at 4k under multi-TopK, whose forward takes its k code from those 4k."""
        return self.encoder()._replace(k=self.wide_k) if self.trains_wide else self.encoder()

    def loss_terms(self, out: SaeOutput, step: Step, knobs: Knobs) -> list[LossTerm]:
        aux = auxk_loss(self, out, step, knobs.k_aux) if knobs.aux_alpha > 0 and bool(step.dead.any()) else None
        terms = [LossTerm("aux_loss", knobs.aux_alpha, torch.zeros((), device=out.x.device) if aux is None else aux)]
        if self.multi_topk:  # the training code at 4k, by this architecture's own rule, and its normalized MSE
            wide = self.wide_reconstruction(out, step)  # (B, D)
            terms.append(LossTerm("multi_topk_loss", MULTI_TOPK_WEIGHT, Reconstruction().add(out.x, wide)))
        return terms

    def reconstruct(self, out: SaeOutput, latents: Latents) -> Tensor:
        """What the code ``latents`` of the forward that gave ``out`` reconstructs (B, D) (a transcoder: with
        its skip path)."""
        return self.decode(latents)

    def wide_reconstruction(self, out: SaeOutput, step: Step) -> Tensor:
        """What the training code at 4k of the forward that gave ``out`` reconstructs (B, D).

        From the forward's own selection (multi_code) it is the k code's reconstruction plus the decode of the
        other 3k entries: the decoder's work and gradients cover 4k entries a token, not k + 4k, and autograd
        sums both losses' gradients into the k code's decode. Else (RouteSAE's inner SAE, which selects
        otherwise) a forward at 4k.
        """
        kept, self.wide = self.wide, None  # consumed, so the step's graph is not held past it
        if kept is not None and kept[0] is out.latents:
            others = kept[1]
            return out.x_hat + self.decode_rows(others, step.low_precision)
        return self.reconstruct(out, self(out.x, k=self.wide_k, low_precision=step.low_precision).latents)

    def log_fields(self) -> list[str]:
        return ["multi_topk_loss"] if self.multi_topk else []  # a loss term, logged only where it is trained

    def after_step(self, out: SaeOutput, step: Step, knobs: Knobs) -> None:
        if knobs.recipe != "reference" or step.number % REFERENCE_RENORM == 0:
            self.normalize_decoder()
        revive(self, out, step, knobs.revive)


def auxk_loss(sae: TopKSAE, out: SaeOutput, step: Step, k_aux: int) -> Tensor:
    """AuxK: the top dead latents reconstruct what the live ones missed (a normalized MSE)."""
    dead_ids = step.dead.nonzero().squeeze(1)  # (n_dead,)
    k_aux = min(k_aux, len(dead_ids) - 1)
    if k_aux < 1:
        return torch.zeros((), device=out.x.device)
    residual = (out.x - out.x_hat).detach()  # (B, D)
    # the dead rows with a sparse gradient (their rows only), which autograd adds into the dense one of the
    # main loss in place: plain indexing would zero-fill and add a whole (N, D) gradient per matrix
    w_enc, w_dec = (F.embedding(dead_ids, w, sparse=True) for w in (sae.W_enc, sae.W_dec))  # (n_dead, D) each
    x, b_enc, pre_bias = out.encoded.detach(), sae.b_enc[dead_ids], sae.pre_bias.detach()
    # the dead rows' gradient as the main loss's: tangent to unit rows, or whole for free rows (transcoders)
    guess = aux_decode(x, w_enc, b_enc, pre_bias, w_dec, k_aux, step.low_precision, sae.tangent_decoder_grad)
    # the spread about the mean, sum ||r||^2 - ||sum r||^2 / B: two reads of the residual, no centered copy (its
    # mean is small next to its spread, so the difference loses little)
    spread = torch.linalg.vector_norm(residual).square() - residual.sum(0).square().sum() / len(residual)
    return F.mse_loss(guess, residual, reduction="sum") / spread.clamp_min(1e-12)  # one fused pass


def revive(sae: TopKSAE, out: SaeOutput, step: Step, rate: float) -> None:
    """Raise the encoder bias of every dead latent by ``rate`` x the batch's mean k-th activation.

    A latent dies when its pre-activation is negative on every token: no gradient reaches it, and AuxK,
    which reads ReLU'd pre-activations, sees zeros. The rise, repeated each step it stays dead, brings its
    best tokens above zero, where AuxK trains it, and then into the top k. Measured on the demo cache
    (benchmarks/RESULTS.md): 4096 latents at lr 8e-3, 0.2 with an 8,192-token threshold turns 13 % dead
    latents into 0.8-0.95 % at the same FVU; at 16384 latents it did not help.
    """
    if rate <= 0 or not bool(step.dead.any()):
        return
    with torch.no_grad():
        kth = out.latents.acts.min(dim=1).values.clamp_min(0).mean()  # the top-k threshold's scale
        sae.b_enc[step.dead] += rate * step.average(kth.reshape(1))  # every rank adds the same
