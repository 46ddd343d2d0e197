"""The BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

    training   z = the k x B largest entries of ReLU(W_enc (x - b_dec) + b_enc) over the whole batch
    inference  z = ReLU(pre) * (pre > threshold)          one scalar threshold, estimated while training
    x_hat = W_dec^T z + b_dec

A token gets as many latents as it earns against the rest of its batch, k on average. The training code
is held flat, token by token (:class:`pipeline.sae.threshold.Code`, the threshold SAEs' sparse kernels), not
padded to the busiest token: the busiest holds ~2.2 k on the demo rows, so a padded code paid for twice
its entries in every sparse product. Everything else is TopK's (:class:`TopKSAE`): parameters and their
initialization, the pre-bias start, unit-norm decoder rows, AuxK and revive.

The threshold is the paper's estimate, the smallest activation the batch top-k keeps, averaged over
batches: a plain mean over the first 1 / THRESHOLD_RATE steps, then an exponential moving average at
THRESHOLD_RATE, so it follows the weights as they move. SAELens's rate (``topk_threshold_lr`` 0.01) lags
on runs as short as the demo's (~400 steps): on the test's 300 steps the smallest kept activation fell
from 0.52 to 0.29 while its 0.01-average stayed at 0.33, and the held-out L0 came out 3.46 for k = 4;
at 0.05 it is 3.99 (tests/test_arch_batchtopk.py). A batch's smallest kept activation is an order
statistic of k x B values, so twenty batches average away its noise. The threshold is the buffer
``threshold`` (shape ()) of sae.safetensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import Knobs, Latents, SaeConfig, SaeOutput, Step, register
from pipeline.sae.selection import Encoder, Selection, encoder_preacts, top_k
from pipeline.sae.threshold import Code, Pattern, SparsePre, decode, padded, restrict

THRESHOLD_RATE = 0.05  # weight of each batch's smallest kept activation in the threshold's moving average
CANDIDATES = 2  # each row's top CANDIDATES x k compete for the batch's k x B; rows needing more are read whole


def batch_topk(pre: Tensor, total: int, per_row: int) -> Tensor:
    """The ``total`` largest entries of ReLU(``pre``) (B, N) over all rows, as flat positions b x N + n (M,),
    row by row (the order :class:`SparsePre` reads).

    Exact (ties at the cut taken in row-major order) without sorting all B x N entries: the cut is found
    among each row's ``per_row`` largest (its candidates). A row whose smallest candidate still makes the cut
    (and is positive) may hold more winners, so all its entries join the pool and the cut is found again;
    it can only rise then, so the other rows still hold all of theirs, and no winner or tie lies outside
    the pool: the winners are read off the pool with one comparison, no pass over the (B, N) matrix.
    """
    rows, width = pre.shape
    per_row, total = min(per_row, width), min(total, rows * width)
    cand_vals, cand = top_k(pre, per_row)  # (B, c) each
    cut = kth_largest(cand_vals.flatten(), total)  # () the cut among the candidates
    row_min = cand_vals.amin(dim=1)  # (B,)
    whole = (row_min >= cut) & (row_min > 0)  # (B,) rows that may hold more than c winners
    pos = (cand + torch.arange(rows, device=pre.device)[:, None] * width)[~whole].flatten()  # (P,) row by row
    vals = cand_vals[~whole].flatten()  # (P,)
    if bool(whole.any()):  # their every entry joins the pool, after the others: the rows sorted below
        pos = torch.cat([pos, (whole.nonzero() * width + torch.arange(width, device=pre.device)).flatten()])
        vals = torch.cat([vals, pre[whole].flatten()])
        cut = kth_largest(vals, total)
    won = vals > cut.clamp(min=0)  # (P,) a non-positive entry is no activation: fewer than total then
    short = total - int(won.count_nonzero())  # entries equal to a positive cut still to take
    if short > 0 and bool(cut > 0):
        tied = (vals == cut).nonzero().squeeze(1)  # (T,) places in the pool
        won[tied[pos[tied].argsort()[:short]]] = True  # the first in row-major order
    found = pos[won]  # (M,)
    return found.sort().values if bool(whole.any()) else found


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th largest of ``values`` (M,), a selection rather than a sort."""
    return values.kthvalue(len(values) - k + 1).values


class Kept(NamedTuple):
    """A training forward's codes, kept for its loss terms."""

    latents: Latents  # (B, W) the padded code the forward returned (identifies the forward)
    code: Code  # the same code, flat, in the graph
    wide: Code | None  # multi-TopK: the 4k code's entries outside the k code, until loss_terms consumes them


@register("batchtopk", trainable=True)
class BatchTopKSAE(TopKSAE):
    """A TopK SAE trained with a batch top-k and used with one threshold."""

    threshold: Tensor  # () the inference threshold on ReLU'd pre-activations

    def __init__(
        self, cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__(cfg, generator, device)
        self.register_buffer("threshold", torch.zeros((), device=device))
        self.kept: Kept | None = None  # the last training forward's codes, for its loss terms

    def encode(
        self, x: Tensor, k: int | None = None, theta: float | None = None, low_precision: bool = False
    ) -> Latents:
        """The inference code of ``x`` (B, D): every latent above the threshold (``theta`` if given);
        with ``k`` alone, TopK's k per token."""
        if k is not None and theta is None:
            return super().encode(x, k, None, low_precision)
        return super().encode(x, None, float(self.threshold) if theta is None else theta)

    def dense_code(self, x: Tensor) -> Tensor:
        """The thresholded code of ``x`` (M, D) as a dense (M, N) tensor, differentiable in x."""
        code = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t()).relu()  # (M, N)
        return code * (code > self.threshold)

    def batch_code(self, x: Tensor, k: int, low_precision: bool = False) -> Code:
        """The training code of a batch ``x`` (B, D): its k x B largest activations, flat, exact float32 values."""
        pre = encoder_preacts(x, [self.encoder()], low_precision)  # (B, N), bf16 when low_precision
        found = batch_topk(pre, k * len(x), CANDIDATES * k)  # (M,) flat positions, row by row
        zero = self.b_enc.new_zeros(self.cfg.n_latents)  # (N,) the ReLU's floor
        acts, *entries = SparsePre.apply(x, self.W_enc, self.b_enc, self.b_dec, zero, found, low_precision)
        return Code(acts, acts, Pattern(*entries))

    def decode_code(self, code: Code, low_precision: bool = False) -> Tensor:
        """Reconstruction (B, D) from a flat training code (``low_precision``: it and W_dec's gradient in bf16)."""
        return decode(code.acts, code.pattern, self.W_dec, self.tangent_decoder_grad, low_precision) + self.b_dec

    def forward(
        self,
        x: Tensor,
        k: int | None = None,
        theta: float | None = None,
        low_precision: bool = False,
        chosen: Selection | None = None,
    ) -> SaeOutput:
        """In training, the batch top-k code at ``k`` (default cfg.k); in eval mode, :meth:`encode`'s. The
        training code's padded form (detached) is the step's bookkeeping; its flat form is kept for the loss."""
        if not self.training or theta is not None or chosen is not None:
            return super().forward(x, k, theta, low_precision, chosen)
        if self.trains_wide and k is None:
            code, wide = self.batch_multi_code(x, low_precision)
        else:
            code, wide = self.batch_code(x, k or self.cfg.k, low_precision), None
        latents = padded(code.acts, code.pattern)  # (B, W)
        self.kept = Kept(latents, code, wide)
        return SaeOutput(x, self.decode_code(code, low_precision), latents, None, None)

    def batch_multi_code(self, x: Tensor, low_precision: bool) -> tuple[Code, Code]:
        """A multi-TopK step's training code of ``x`` (B, D) at k and the rest of its code at 4k, from one batch
        top-k at 4k: the k x B largest of the 4k x B are the batch top-k at k (ties aside), so the encoder GEMM
        runs once a step, and both codes' values are gathers of the 4k code's (both losses' gradients meet in
        SparsePre's backward), as TopKSAE.multi_code does per token."""
        wide = self.batch_code(x, self.wide_k, low_precision)  # (M,) flat
        pick = wide.acts.detach().topk(min(self.cfg.k * len(x), len(wide.acts)), sorted=False).indices
        keep = torch.zeros(len(wide.acts), dtype=torch.bool, device=x.device).index_fill_(0, pick, True)  # (M,)
        return restrict(wide, keep, len(x)), restrict(wide, ~keep, len(x))

    def training_code(self, out: SaeOutput) -> Code:
        """The flat code of the training forward that gave ``out``."""
        assert self.kept is not None and self.kept.latents is out.latents, "a training forward gave out"
        return self.kept.code

    def wide_reconstruction(self, out: SaeOutput, step: Step) -> Tensor:
        """The reconstruction of the 4k code that the forward that gave ``out`` kept: the k code's plus the
        decode of the other entries (consumed, so the step's graph is not held past it). There is no other: a
        forward's padded code is detached."""
        kept = self.kept
        assert kept is not None and kept.wide is not None and kept.latents is out.latents, "a multi-TopK forward"
        self.kept = kept._replace(wide=None)
        wide = kept.wide
        return out.x_hat + decode(wide.acts, wide.pattern, self.W_dec, self.tangent_decoder_grad, step.low_precision)

    # --- training hooks (pipeline.sae.interface.SAE) ---

    def shared_encoder(self) -> Encoder | None:
        return None  # the batch top-k is not a per-token selection a sweep's shared GEMM could make

    def after_step(self, out: SaeOutput, step: Step, knobs: Knobs) -> None:
        self.track_threshold(out.latents, step)
        super().after_step(out, step, knobs)
        self.kept = None  # the step is done: its codes are not held to the next

    @torch.no_grad()
    def track_threshold(self, latents: Latents, step: Step) -> None:
        """Move the threshold towards the batch's smallest kept activation (the same on every rank)."""
        acts = latents.acts  # (B, W)
        smallest = acts.where(acts > 0, torch.inf).amin()  # () inf when nothing was kept
        smallest = step.average(torch.where(smallest.isfinite(), smallest, self.threshold).reshape(1))[0]
        self.threshold.lerp_(smallest.to(self.threshold.dtype), max(1 / (step.number + 1), THRESHOLD_RATE))

    def step_metrics(self, out: SaeOutput) -> dict[str, float]:
        return {**super().step_metrics(out), "threshold": float(self.threshold)}

    def log_fields(self) -> list[str]:
        return [*super().log_fields(), "threshold"]
