"""The BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

    training   z = the k x B largest entries of ReLU(W_enc (x - b_dec) + b_enc) over the whole batch
    inference  z = ReLU(pre) * (pre > threshold)          one scalar threshold, estimated while training
    x_hat = W_dec^T z + b_dec

A token gets as many latents as it earns against the rest of its batch, k on average: the sparse code is
padded with zeros to the busiest row. Everything else is TopK's (:class:`TopKSAE`): parameters and their
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

import torch
from torch import Tensor

from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import Knobs, Latents, SaeConfig, SaeOutput, Step, register
from pipeline.sae.kernels import Encoder, TopKEncode, encoder_preacts, topk_indices

THRESHOLD_RATE = 0.05  # weight of each batch's smallest kept activation in the threshold's moving average
CANDIDATES = 2  # each row's top CANDIDATES x k compete for the batch's k x B; rows needing more are read whole


def batch_topk(pre: Tensor, total: int, per_row: int) -> tuple[Tensor, Tensor]:
    """The ``total`` largest entries of ReLU(``pre``) (B, N) over all rows, as latent ids (B, W) padded to the
    busiest row's W, and a mask (B, W) of the real ones.

    Exact (ties at the cut taken in row-major order) without sorting all B x N entries: the cut is found
    among each row's ``per_row`` largest. A row whose smallest candidate still makes the cut (and is
    positive) may hold more winners, so all its entries join the pool and the cut is found again; it can
    only rise then, so the other rows still hold all of theirs. The winners are then read off ``pre`` with
    one comparison, in row order, so no top-k or sort of the k x B winners is needed.
    """
    rows, width = pre.shape
    per_row, total = min(per_row, width), min(total, rows * width)
    cand_vals = pre.gather(1, topk_indices(pre, per_row))  # (B, c)
    cut = kth_largest(cand_vals.flatten(), total)  # () the cut among the candidates
    row_min = cand_vals.amin(dim=1)  # (B,)
    whole = (row_min >= cut) & (row_min > 0)  # (B,) rows that may hold more than c winners
    if bool(whole.any()):
        cut = kth_largest(torch.cat([cand_vals[~whole].flatten(), pre[whole].flatten()]), total)
    won = pre > cut.clamp(min=0)  # (B, N) a non-positive entry is no activation: fewer than total then
    short = total - int(won.count_nonzero())  # entries equal to a positive cut still to take (a bool sum
    # would first copy the (B, N) mask to int64: 14x slower on a 4096 x 4096 mask here)
    if short > 0 and bool(cut > 0):
        tied = (pre == cut).flatten().nonzero().squeeze(1)[:short]  # (short,) first in row-major order
        won.view(-1)[tied] = True
    row_of, col_of = won.nonzero(as_tuple=True)  # (M,) each, in row order
    return pad_sorted(row_of, col_of, rows)


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th largest of ``values`` (M,), a selection rather than a sort."""
    return values.kthvalue(len(values) - k + 1).values


def pad_rows(row_of: Tensor, col_of: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """The columns ``col_of`` (M,) of ``rows`` rows, entry j in row ``row_of[j]``, as a (B, W) table padded with 0
    to the busiest row's W, and a mask (B, W) of the real entries."""
    row_of, order = row_of.sort(stable=True)  # (M,) in row order
    return pad_sorted(row_of, col_of[order], rows)


def pad_sorted(row_of: Tensor, col_of: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """:func:`pad_rows` of entries already in row order."""
    counts = torch.bincount(row_of, minlength=rows)  # (B,) entries per row
    slot = torch.arange(len(row_of), device=row_of.device) - (counts.cumsum(0) - counts)[row_of]  # (M,) place in row
    padded = torch.zeros(rows, max(int(counts.max()), 1), dtype=torch.long, device=row_of.device)  # (B, W)
    padded[row_of, slot] = col_of
    real = torch.arange(padded.shape[1], device=row_of.device) < counts[:, None]  # (B, W)
    return padded, real


@register("batchtopk", trainable=True)
class BatchTopKSAE(TopKSAE):
    """A TopK SAE trained with a batch top-k and used with one threshold."""

    threshold: Tensor  # () the inference threshold on ReLU'd pre-activations

    def __init__(
        self, cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__(cfg, generator, device)
        self.register_buffer("threshold", torch.zeros((), device=device))

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

    def batch_code(self, x: Tensor, k: int, low_precision: bool = False) -> Latents:
        """The training code of a batch ``x`` (B, D): its k x B largest activations, exact float32 values."""
        pre = encoder_preacts(x, [self.encoder()], low_precision)  # (B, N), bf16 when low_precision
        ids, real = batch_topk(pre, k * len(x), CANDIDATES * k)  # (B, W) each
        acts, ids = TopKEncode.apply(x, self.W_enc, self.b_enc, self.b_dec, ids.shape[1], False, ids)
        return Latents(acts * real, ids)

    def forward(
        self,
        x: Tensor,
        k: int | None = None,
        theta: float | None = None,
        low_precision: bool = False,
        chosen: Tensor | None = None,
    ) -> SaeOutput:
        """In training, the batch top-k code at ``k`` (default cfg.k); in eval mode, :meth:`encode`'s."""
        if not self.training or theta is not None or chosen is not None:
            return super().forward(x, k, theta, low_precision, chosen)
        if self.trains_wide and k is None:
            latents = self.batch_multi_code(x, low_precision)
        else:
            latents = self.batch_code(x, k or self.cfg.k, low_precision)
        return SaeOutput(x, self.decode(latents), latents, None, None)

    def batch_multi_code(self, x: Tensor, low_precision: bool) -> Latents:
        """A multi-TopK step's training code of ``x`` (B, D), taken from one batch top-k at 4k (kept in ``wide``
        for loss_terms): the k x B largest of the 4k x B are the batch top-k at k (ties aside), so the encoder
        GEMM runs once a step, and the k code's values are a gather of the 4k code's (both losses' gradients
        meet in TopKEncode's backward), as TopKSAE.multi_code does per token."""
        wide = self.batch_code(x, self.wide_k, low_precision)  # (B, W) each
        width = wide.acts.shape[1]
        pick = wide.acts.flatten().topk(self.cfg.k * len(x), sorted=False).indices  # (k B,) in the (B, W) code
        slots, real = pad_rows(pick // width, pick % width, len(x))  # (B, w) places in the 4k code's rows
        latents = Latents(wide.acts.gather(1, slots) * real, wide.indices.gather(1, slots))  # (B, w) each
        self.wide = (latents, wide)
        return latents

    # --- training hooks (pipeline.sae.interface.SAE) ---

    def shared_encoder(self) -> Encoder | None:
        return None  # the batch top-k is not a per-token selection a sweep's shared GEMM could make

    def after_step(self, out: SaeOutput, step: Step, knobs: Knobs) -> None:
        self.track_threshold(out.latents, step)
        super().after_step(out, step, knobs)

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
