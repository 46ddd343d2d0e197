"""AuxK's decode of a few (dead) latents, as an autograd function: dense GEMMs over their rows only, the sparse
kernels of :mod:`pipeline.sae.kernels` once they are many."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.sae.kernels import SparseDecode, TopKEncode

DENSE_AUX = 5  # dense GEMMs up to this x k_aux dead latents, the sparse kernels past it (even near 5.2x in bf16)


class AuxDecode(torch.autograd.Function):
    """(x, W_enc, b_enc, b_dec, W_dec) of a few latents -> sum over b's top-k of ReLU(pre[b, j]) W_dec[j], (B, D).

    AuxK's latents are few and their code is dense: early in training k_aux exceeds their number and a third
    of their pre-activations are positive on the demo, so every product is a GEMM over the (B, n) code (five
    of B x n x D), with bf16 operands under ``low_precision`` (float32 sums, as the sparse kernels' products).
    On one core that is 2.0-2.3x the float32 positive-entry form it replaced (embedding bags, a sampled
    product, index puts) at 100-600 dead latents, and even with it in float32 (benchmarks/auxk_forms.py). The
    top-k is skipped when no token has more than k positive. With ``tangent`` the decoder gradient stays
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
        low_precision: bool,
    ) -> Tensor:
        dtype = torch.bfloat16 if low_precision else x.dtype
        centered = torch.sub(x, b_dec, out=torch.empty(x.shape, dtype=dtype, device=x.device))  # (B, D) one pass
        code = (centered @ w_enc.to(dtype).t()).to(x.dtype).add_(b_enc).relu_()  # (B, n)
        if int((code > 0).sum(1).max()) > k:  # else the top k hold every positive entry: the ReLU decides alone
            top = code.topk(k, dim=1, sorted=False)  # (B, k)
            code = torch.zeros_like(code).scatter_(1, top.indices, top.values)
        ctx.save_for_backward(centered, w_enc, w_dec, code)
        ctx.tangent = tangent
        return (code.to(dtype) @ w_dec.to(dtype)).to(x.dtype)  # (B, D)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN401
        centered, w_enc, w_dec, code = ctx.saved_tensors
        dtype = centered.dtype
        grad = grad_out.to(dtype)  # (B, D)
        grad_code = (grad @ w_dec.to(dtype).t()).to(code.dtype)  # (B, n) <g_b, W_dec[j]>
        grad_w_dec = (code.to(dtype).t() @ grad).to(code.dtype)  # (n, D)
        if ctx.tangent:  # drop each row's component along itself: <grad_w_dec[j], W_dec[j]> = sum_b z_bj <g_b, W_j>
            grad_w_dec.addcmul_((code * grad_code).sum(0)[:, None], w_dec, value=-1)
        grad_pre = grad_code.mul_(code > 0)  # (B, n) through the ReLU and the top-k
        grad_b_enc = grad_pre.sum(0)  # (n,)
        grad_w_enc = (grad_pre.to(dtype).t() @ centered).to(code.dtype)  # (n, D): the input was x - b_dec
        grad_x = grad_pre @ w_enc if ctx.needs_input_grad[0] else None  # (B, D)
        grad_b_dec = -(grad_b_enc @ w_enc) if ctx.needs_input_grad[3] else None
        return grad_x, grad_w_enc, grad_b_enc, grad_b_dec, grad_w_dec, None, None, None


def aux_decode(
    x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, w_dec: Tensor, k: int, low_precision: bool, tangent: bool
) -> Tensor:
    """The top-``k`` reconstruction (B, D) of ``x`` by a subset of latents (AuxK's dead ones); with ``tangent``
    the decoder gradient is kept tangent to its unit rows as in :class:`SparseDecode` (free rows: not).

    Up to DENSE_AUX x k latents dense GEMMs (:class:`AuxDecode`); past it, where the share picked is small, the
    sparse kernels. Both take bf16 operands when ``low_precision``.
    """
    if w_enc.shape[0] > DENSE_AUX * k:
        acts, idx = TopKEncode.apply(x, w_enc, b_enc, b_dec, k, low_precision)  # (B, k) twice
        return SparseDecode.apply(acts, idx, w_dec, tangent, None, None, low_precision)
    return AuxDecode.apply(x, w_enc, b_enc, b_dec, w_dec, k, tangent, low_precision)
