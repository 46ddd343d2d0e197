"""AuxK's decode of a few (dead) latents, as an autograd function: a float32 selection GEMM over their rows only,
the sparse kernels of :mod:`pipeline.sae.kernels` once they are many."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.sae.kernels import SparseDecode, TopKEncode, bag_dot

DENSE_AUX = 6  # AuxK's float32 selection GEMM up to this x k_aux dead latents; past it a bf16 one (sparse kernels)


class AuxDecode(torch.autograd.Function):
    """(x, W_enc, b_enc, b_dec, W_dec) of a few latents -> sum over b's top-k of ReLU(pre[b, j]) W_dec[j], (B, D).

    AuxK's latents are dead: most of their pre-activations are negative (1 in 9 positive on the demo, whose
    ~100 dead latents make k_aux nearly all of them, so the top-k is skipped when no token has more than k
    positive). The decode and the gradient of the code read only the positive entries (embedding bags);
    the weight gradients are two GEMMs over the (B, n) code. With ``tangent`` the decoder gradient stays
    tangent to its unit rows as in :class:`SparseDecode`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        w_dec: Tensor,
        k: int,
        tangent: bool,  # noqa: ANN401
    ) -> Tensor:
        # W (x - b_dec) + b_enc = W x + (b_enc - W b_dec): the centered input is never materialized
        vals = torch.addmm(torch.addmv(b_enc, w_enc, b_dec, alpha=-1), x, w_enc.t())  # (B, n)
        idx = None
        if int((vals > 0).sum(1).max()) > k:  # else the top k hold every positive entry: the ReLU decides alone
            vals, idx = vals.topk(k, dim=1, sorted=False)  # (B, k)
        flat = (vals > 0).view(-1).nonzero().squeeze(1)  # (E,) positive entries, token by token
        acts = vals.view(-1)[flat]  # (E,)
        latents = flat % vals.shape[1] if idx is None else idx.view(-1)[flat]  # (E,)
        tokens = torch.div(flat, vals.shape[1], rounding_mode="floor")  # (E,)
        offsets = torch.searchsorted(tokens, torch.arange(len(x), device=x.device))  # (B,) each token's first
        ctx.save_for_backward(x, w_enc, b_dec, w_dec, acts, latents, offsets, tokens)
        ctx.tangent = tangent
        return F.embedding_bag(latents, w_dec, offsets, per_sample_weights=acts, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN401
        x, w_enc, b_dec, w_dec, acts, latents, offsets, tokens = ctx.saved_tensors
        grad_acts = bag_dot(grad_out, w_dec, latents, offsets, tokens)  # (E,) <g_b, W_dec[j]>
        code = torch.zeros(len(x), w_enc.shape[0], dtype=acts.dtype, device=acts.device)  # (B, n)
        grad_w_dec = code.index_put_((tokens, latents), acts).t() @ grad_out  # (n, D)
        if ctx.tangent:
            along = acts * grad_acts  # (E,) each entry's share of <grad_w_dec[j], W_dec[j]>
            radial = along.new_zeros(w_enc.shape[0]).index_add_(0, latents, along)  # (n,)
            grad_w_dec.addcmul_(radial[:, None], w_dec, value=-1)  # drop each row's component along itself
        grad_pre = code.index_put_((tokens, latents), grad_acts)  # (B, n), the same zeros
        grad_b_enc = grad_pre.sum(0)  # (n,)
        grad_w_enc = (grad_pre.t() @ x).addr_(grad_b_enc, b_dec, alpha=-1)  # (n, D): the input was x - b_dec
        grad_x = grad_pre @ w_enc if ctx.needs_input_grad[0] else None  # (B, D)
        grad_b_dec = -(grad_b_enc @ w_enc) if ctx.needs_input_grad[3] else None
        return grad_x, grad_w_enc, grad_b_enc, grad_b_dec, grad_w_dec, None, None


def aux_decode(
    x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, w_dec: Tensor, k: int, low_precision: bool, tangent: bool
) -> Tensor:
    """The top-``k`` reconstruction (B, D) of ``x`` by a subset of latents (AuxK's dead ones); with ``tangent``
    the decoder gradient is kept tangent to its unit rows as in :class:`SparseDecode` (free rows: not).

    Up to DENSE_AUX x k latents the selection is one float32 GEMM (:class:`AuxDecode`); past it, where the
    share picked is small, the sparse kernels (a bf16 GEMM and bf16 weight-gradient operands when
    ``low_precision``).
    """
    if w_enc.shape[0] > DENSE_AUX * k:
        acts, idx = TopKEncode.apply(x, w_enc, b_enc, b_dec, k, low_precision)  # (B, k) twice
        return SparseDecode.apply(acts, idx, w_dec, tangent, None, None, low_precision)
    return AuxDecode.apply(x, w_enc, b_enc, b_dec, w_dec, k, tangent)
