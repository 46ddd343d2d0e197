"""Sparse building blocks of the threshold SAEs' training (standard, jumprelu, gated), as TopK's are in
:mod:`pipeline.sae.kernels`; BatchTopK's flat training code is built from them too.

A threshold code keeps the latents whose pre-activation exceeds a per-latent floor (0; JumpReLU: its
threshold, less the straight-through window below it). The dense work is one GEMM without autograd that
finds them; everything after touches only those entries, held flat (token by token, no padding to the
busiest token, ~4x the mean on the demo): their exact float32 pre-activations, the code, the
decode (embedding bags) and every gradient (CSR sparse matmuls, index adds). No (tokens x latents)
gradient is formed. A batch with too many entries (early L1 warm-up: thousands per token) is trained
densely instead, by autograd over (B, N) tensors: :class:`Code` carries either form, and the losses read
it through :func:`per_entry`, :func:`token_sums` and :func:`decode`, which serve both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.sae.interface import Latents, pack
from pipeline.sae.kernels import SparseDecode, bag_dot, sparse_t_matmul
from pipeline.sae.selection import bias_columns, workspace

# A batch trains densely when its candidate entries exceed this share of B x N. The flat kernels cost in
# proportion to the entries (a few gathers of a D-wide row each), the dense path two more full GEMMs and a
# float32 forward one. Measured (standard SAE, 4096 latents, d 576, batch 4096, one core, CPU seconds of a
# forward and backward, sparse / dense) at a mean width of 64: 0.48 / 1.73; 128: 0.77 / 1.51; 256: 1.32 /
# 1.97; 512: 2.70 / 1.88. They break even near 370 entries a token: a tenth of the latents, counting the
# selection's ~10 % spare candidates. The share is of all entries, not of the busiest token's: the flat
# layout pays for entries, never for padding.
DENSE_SHARE = 1 / 10


class Pattern(NamedTuple):
    """Which (token, latent) entries a flat code holds, listed token by token."""

    latents: Tensor  # (E,) latent of each entry
    tokens: Tensor  # (E,) token of each entry, non-decreasing
    offsets: Tensor  # (B,) each token's first entry


class Code(NamedTuple):
    """A training forward's code: dense (B, N) tensors (``pattern`` None), or the entries of ``pattern``."""

    pre: Tensor  # (B, N) | (E,) encoder pre-activations W_enc (x - b_dec) + b_enc
    acts: Tensor  # the code z, shaped as pre
    pattern: Pattern | None


def per_entry(param: Tensor, pattern: Pattern | None) -> Tensor:
    """A per-latent tensor (N,) aligned with a code's entries: (E,) gathered, or (N,) to broadcast over (B, N)."""
    return param if pattern is None else param[pattern.latents]


def token_sums(values: Tensor, pattern: Pattern | None) -> Tensor:
    """Per token (B,), the sum of ``values`` over its entries."""
    if pattern is None:
        return values.sum(1)
    return values.new_zeros(len(pattern.offsets)).index_add_(0, pattern.tokens, values)


def decode(
    values: Tensor, pattern: Pattern | None, w_dec: Tensor, tangent: bool, low_precision: bool = False
) -> Tensor:
    """sum_i values_i W_dec[i] per token (B, D); ``tangent``: W_dec's gradient kept tangent to its unit rows;
    ``low_precision``: a flat code's decode and W_dec gradient from bf16 operands (kernels.SparseDecode)."""
    if pattern is None:
        return DenseDecode.apply(values, w_dec, tangent)  # type: ignore[no-any-return]
    entries = (pattern.latents, w_dec, tangent, pattern.offsets, pattern.tokens, low_precision)
    return SparseDecode.apply(values, *entries)  # type: ignore[no-any-return]


def padded(acts: Tensor, pattern: Pattern | None) -> Latents:
    """The code's firing entries as padded Latents (detached), as wide as the busiest token."""
    acts = acts.detach()
    if pattern is None:
        return pack(acts)
    rows = len(pattern.offsets)
    slot = torch.arange(len(acts), device=acts.device) - pattern.offsets[pattern.tokens]  # (E,) place in its row
    width = int(slot.max()) + 1 if len(acts) else 1
    values = acts.new_zeros(rows, width).index_put_((pattern.tokens, slot), acts)  # (B, width)
    indices = pattern.latents.new_zeros(rows, width).index_put_((pattern.tokens, slot), pattern.latents)
    return Latents(values, indices)


def restrict(code: Code, keep: Tensor, rows: int) -> Code:
    """The entries of a flat code (of ``rows`` tokens) where ``keep`` (E,) holds, still token by token; its
    values stay in the graph."""
    assert code.pattern is not None, "a flat code"
    latents, tokens = code.pattern.latents[keep], code.pattern.tokens[keep]  # (E',) each
    return Code(code.pre[keep], code.acts[keep], Pattern(latents, tokens, token_offsets(tokens, rows)))


def token_offsets(tokens: Tensor, rows: int) -> Tensor:
    """Each token's first entry (B,) in a list of entries sorted by token."""
    offsets = torch.zeros(rows, dtype=torch.int64, device=tokens.device)
    offsets[1:] = torch.bincount(tokens, minlength=rows)[:-1].cumsum(0)
    return offsets


@torch.no_grad()
def candidates(
    x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, floor: Tensor, low_precision: bool
) -> Tensor | None:
    """Flat positions b x N + n (C,) of every entry whose pre-activation may exceed ``floor`` (N,), or None when
    there are more than DENSE_SHARE of them.

    One GEMM, W_enc (x - b_dec) - (floor - b_enc - margin), the last term as two extra columns (a high and a
    low bf16 part) so the product's sign alone decides (rounding keeps signs). The margin covers the GEMM's
    rounding against the exact float32 recompute (:class:`SparsePre`, which drops the candidates below the
    floor): float32 accumulation in any order, |error| <= 2 D 2^-24 ||x - b_dec|| ||W_n|| (a bound), and, in
    bf16, the operands' rounding to u = 2^-8, a sum of D independent errors of standard deviation <=
    u sqrt(2/3) sqrt(sum_d (x_d W_nd)^2): six of them (Gaussian odds 1e-9; TopK's bf16 selection has the same
    kind of slack at near-ties). In float32 nothing above its floor is missed.
    """
    rows, d = x.shape
    dtype = torch.bfloat16 if low_precision else x.dtype
    centered = x - b_dec  # (B, D)
    inputs = workspace("thr_x", (rows, d + 2), dtype, x.device)  # [x - b_dec | 1 | 1]
    inputs[:, :d].copy_(centered)
    inputs[:, d:] = 1
    norm, peak = centered.norm(dim=1).max(), centered.abs().max()  # over the batch
    w_norm, w_peak = w_enc.norm(dim=1), w_enc.abs().amax(dim=1)  # (N,)
    margin = 2 * d * 2.0**-24 * norm * w_norm + 1e-6  # (N,) float32 accumulation
    if low_precision:  # sum_d (x_d W_nd)^2 <= min(max|x|^2 ||W_n||^2, ||x||^2 max|W_n|^2)
        margin = margin + 6 * 2.0**-8 * (2 / 3) ** 0.5 * torch.minimum(peak * w_norm, norm * w_peak)
    bar = floor - b_enc  # (N,) pre > floor <=> W (x - b_dec) > bar
    bar = bar - margin - 4 * 2.0**-24 * (bar.abs() + floor.abs())  # float32 rounding of the two sides
    weight = workspace("thr_w", (len(w_enc), d + 2), dtype, x.device)  # [W | -bar_hi | -bar_lo]
    weight[:, :d].copy_(w_enc)
    bias_columns(weight[:, d:], -bar)
    y = torch.mm(inputs, weight.t(), out=workspace("thr_pre", (rows, len(w_enc)), dtype, x.device))  # (B, N)
    found = torch.gt(y, 0, out=workspace("thr_mask", y.shape, torch.bool, x.device)).view(-1).nonzero()
    return None if len(found) > DENSE_SHARE * y.numel() else found.squeeze(1)


class SparsePre(torch.autograd.Function):
    """(x, W_enc, b_enc, b_dec) -> the exact float32 pre-activations (E,) of the ``found`` candidates
    (:func:`candidates`) above ``floor``, with their Pattern; gradients formed only at those entries, W_enc's
    from bf16 operands with ``low_precision`` (kernels.sparse_t_matmul)."""

    @staticmethod
    def forward(
        ctx: Any,  # noqa: ANN401
        x: Tensor,
        w_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        floor: Tensor,
        found: Tensor,
        low_precision: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rows, n = len(x), len(w_enc)
        tokens = torch.div(found, n, rounding_mode="floor")  # (C,) sorted: nonzero lists row by row
        latents = found - tokens * n  # (C,)
        centered = x - b_dec  # (B, D)
        pre = bag_dot(centered, w_enc, latents, token_offsets(tokens, rows), tokens) + b_enc[latents]  # (C,)
        keep = pre > floor[latents]  # (C,) the candidates truly above the floor
        pre, latents, tokens = pre[keep], latents[keep], tokens[keep]  # (E,)
        offsets = token_offsets(tokens, rows)
        ctx.save_for_backward(centered, w_enc, latents, tokens, offsets)
        ctx.mark_non_differentiable(latents, tokens, offsets)
        ctx.low_precision = low_precision
        return pre, latents, tokens, offsets

    @staticmethod
    def backward(ctx: Any, grad_pre: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN401
        centered, w_enc, latents, tokens, offsets = ctx.saved_tensors
        grad_w = sparse_t_matmul(latents, grad_pre, len(w_enc), centered, tokens, ctx.low_precision)  # (N, D)
        grad_b_enc = grad_pre.new_zeros(len(w_enc)).index_add_(0, latents, grad_pre)  # (N,)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(latents, w_enc, offsets, per_sample_weights=grad_pre, mode="sum")  # (B, D)
        grad_b_dec = -(grad_b_enc @ w_enc) if ctx.needs_input_grad[3] else None  # x - b_dec feeds every entry
        return grad_x, grad_w, grad_b_enc, grad_b_dec, None, None, None


class DenseDecode(torch.autograd.Function):
    """(z (B, N), W_dec) -> z @ W_dec; with ``tangent`` W_dec's gradient loses each row's radial component,
    as :class:`pipeline.sae.kernels.SparseDecode`'s does."""

    @staticmethod
    def forward(ctx: Any, code: Tensor, w_dec: Tensor, tangent: bool) -> Tensor:  # noqa: ANN401
        ctx.save_for_backward(code, w_dec)
        ctx.tangent = tangent
        return code @ w_dec

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN401
        code, w_dec = ctx.saved_tensors
        grad_code = grad_out @ w_dec.t() if ctx.needs_input_grad[0] else None  # (B, N)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = code.t() @ grad_out  # (N, D)
            if ctx.tangent:
                grad_w.addcmul_((grad_w * w_dec).sum(1, keepdim=True), w_dec, value=-1)
        return grad_code, grad_w, None


def dead_columns(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, dead: Tensor) -> Tensor:
    """Pre-activations (B, n_dead) of the latents ``dead`` only, differentiable; W_enc's gradient is sparse
    (their rows), which autograd adds into the main loss's dense one in place."""
    rows = F.embedding(dead, w_enc, sparse=True)  # (n_dead, D)
    return torch.addmm(b_enc[dead] - rows @ b_dec, x, rows.t())
