"""Sparse building blocks of TopK training, as autograd functions.

The dense work is one GEMM (``x @ W_enc.T``, :mod:`pipeline.sae.selection`); everything after the top-k
selection touches only ``k`` latents per token. Gradients never form a dense (tokens x latents) matrix:

* encoder weight grad ``S^T @ x`` and decoder weight grad ``S_v^T @ g`` are sparse products (:func:`sparse_t_matmul`:
  torch's embedding-bag kernel over the entries sorted by latent on the CPU, a CSR product on CUDA);
* per-entry dot products ``<a_b, W[idx_bj]>`` (:func:`bag_dot`) are a sampled dense-dense product on the
  CPU and torch's embedding-bag kernel for per-sample-weight gradients on CUDA, so no (tokens, k, D) gather
  is materialized;
* the decoder is ``embedding_bag`` (a weighted sum of k decoder rows per token).

With ``low_precision`` the decode and the weight gradients take bf16 operands (float32 sums), as autocast's
products on a GPU do; the per-entry dot products stay float32.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.sae.selection import Encoder, Selection, cpu_path, select_topk

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

SHORT_KEYS = 2**15  # sparse_t_matmul sorts latent ids as int16 up to this many latents, int32 past it


def padded_bags(rows: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A padded (B, k) code's entries as a flat one's: each token's first entry (B,), each entry's token."""
    return torch.arange(0, rows * k, k, device=device), torch.arange(rows, device=device).repeat_interleave(k)


def bag_dot(
    a: Tensor, weight: Tensor, latents: Tensor, offsets: Tensor, tokens: Tensor, cpu_tuned: bool | None = None
) -> Tensor:
    """out[e] = <a[tokens[e]], weight[latents[e]]> of a flat code, its entries (E,) token by token from
    ``offsets`` (B,), no (E, D) gather.

    On the CPU torch's sampled dense-dense product on the code's CSR pattern (``torch.sparse.sampled_addmm``),
    1.5-2x torch's fused embedding-bag kernel there (4096 tokens, 4096 latents, d 576, 32 or 128 entries a token,
    one core); elsewhere (CUDA) that embedding-bag kernel. ``cpu_tuned`` picks the first (default: on the CPU).
    """
    if cpu_path(a, cpu_tuned) and a.dtype in (torch.float32, torch.float64):
        crow = torch.cat([offsets, offsets.new_full((1,), len(latents))])  # (B + 1,)
        with torch.sparse.check_sparse_tensor_invariants(enable=False):  # built by the caller, token by token
            pattern = torch.sparse_csr_tensor(crow, latents, a.new_zeros(len(latents)), (len(a), len(weight)))
        return torch.sparse.sampled_addmm(pattern, a, weight.t(), beta=0).values()
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(  # noqa: SLF001 - fused CPU/CUDA kernel
        a.contiguous(), weight, latents, offsets, tokens, 0, -1
    )


def sparse_t_matmul(
    latents: Tensor,
    values: Tensor,
    n_rows: int,
    dense: Tensor,
    tokens: Tensor | None = None,
    low_precision: bool = False,
    cpu_tuned: bool | None = None,
) -> Tensor:
    """S^T @ dense, shape (n_rows, D) in dense's dtype, where S (B, n_rows) has ``values[b, j]`` at column
    ``latents[b, j]`` (a padded code), or, given ``tokens``, ``values[e]`` at (tokens[e], latents[e]) (a flat one).

    The entries sorted by latent make one bag per output row. On the CPU the product is torch's embedding-bag
    kernel over those bags (a weighted sum of dense rows per latent): 1.3-1.45x torch's CSR product at 4096
    tokens, 4096 latents, d 576 and 32-128 entries a token, one or two cores. With ``low_precision`` its operands
    are bf16 (its sums float32, rounded to bf16 once): 1.7x again, within 0.3 % of the float32 product. Elsewhere
    (CUDA) the float32 CSR product. ``cpu_tuned`` picks the first (default: on the CPU).
    """
    flat = latents.reshape(-1)
    # a stable sort of small integer keys is torch's radix sort on the CPU, one pass per key byte: int16 keys (up to
    # 32768 rows) take 2.5 ms at 0.5M entries on one core (1.4 on two), int32 4.0 (2.2), int64 7.1 (3.7); it leaves
    # each row's columns (tokens) in ascending order
    order = torch.argsort(flat.to(torch.int16 if n_rows <= SHORT_KEYS else torch.int32), stable=True)
    # int32 positions (both kernels take them): 8 % faster than int64 in the embedding bag at 0.5M entries
    crow = torch.zeros(n_rows + 1, dtype=torch.int32, device=flat.device)  # each latent's first sorted entry
    crow[1:] = torch.bincount(flat, minlength=n_rows).cumsum(0)
    if tokens is None:  # a padded code: entry e is token e // k's
        cols = torch.div(order, latents.shape[1], rounding_mode="floor").int()
    else:  # index_select, not indexing, here and below: 3.5x faster at 0.5M entries on one core
        cols = tokens.index_select(0, order).int()
    weights = values.reshape(-1).index_select(0, order).to(dense.dtype)
    if cpu_path(dense, cpu_tuned):
        rows_in, weights_in = (dense.bfloat16(), weights.bfloat16()) if low_precision else (dense, weights)
        sums = F.embedding_bag(cols, rows_in, crow, mode="sum", per_sample_weights=weights_in, include_last_offset=True)
        return sums.to(dense.dtype)
    # The indices are built just above, so checking them would only cost time; saying so explicitly (the
    # context, not just the argument) also keeps torch from warning of segfaults in every fit's output.
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        matrix = torch.sparse_csr_tensor(crow, cols, weights, (n_rows, dense.shape[0]))
    out = torch.empty(n_rows, dense.shape[1], dtype=dense.dtype, device=dense.device)
    return torch.addmm(out, matrix, dense, beta=0, out=out)  # `matrix @ dense` zero-fills, then copies


class TopKEncode(torch.autograd.Function):
    """(x, W_enc, b_enc, b_dec) -> ReLU'd top-k pre-activations and their latent indices.

    The selection (:func:`select_topk`, or ``chosen`` by one shared with a whole sweep) gives the values too:
    the GEMM's own pre-activations, float32 in float32 (exact up to the order of its sums), and with
    ``low_precision`` bf16 operands and output, as autocast gives them on a GPU (0.4 % median relative error
    on the demo's top 128 of 4096). Recomputing them exactly in float32 was a sampled product over every entry,
    the step's third largest cost. ``low_precision`` also gives W_enc's gradient from bf16 operands
    (:func:`sparse_t_matmul`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        k: int,  # noqa: ANN401
        low_precision: bool,
        chosen: Selection | None = None,
    ) -> tuple[Tensor, Tensor]:
        if chosen is None:  # not chosen already by a GEMM shared with other SAEs (select_topk)
            (chosen,) = select_topk(x, [Encoder(w_enc, b_enc, b_dec, k)], low_precision)
        idx = chosen.indices  # (B, k)
        vals = chosen.pre.relu().to(w_enc.dtype)  # (B, k) a new tensor: the selection's stays as it was
        ctx.save_for_backward(x - b_dec, w_enc, idx, vals)
        ctx.mark_non_differentiable(idx)
        ctx.low_precision = low_precision
        return vals, idx

    @staticmethod
    def backward(ctx: Any, grad_vals: Tensor, _grad_idx: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN401
        centered, w_enc, idx, vals = ctx.saved_tensors
        grad_pre = grad_vals * (vals > 0)  # (B, k) through the ReLU
        grad_w = sparse_t_matmul(idx, grad_pre, w_enc.shape[0], centered, None, ctx.low_precision)  # (N, D)
        grad_b_enc = torch.zeros(w_enc.shape[0], dtype=grad_pre.dtype, device=idx.device)
        grad_b_enc.index_add_(0, idx.reshape(-1), grad_pre.reshape(-1))  # (N,)
        grad_x = (
            F.embedding_bag(idx, w_enc, per_sample_weights=grad_pre, mode="sum") if ctx.needs_input_grad[0] else None
        )  # (B, D), needed when x depends on a router
        grad_b_dec = -(grad_b_enc @ w_enc) if ctx.needs_input_grad[3] else None  # x - b_dec feeds every latent
        return grad_x, grad_w, grad_b_enc, grad_b_dec, None, None, None


class SparseDecode(torch.autograd.Function):
    """(vals, idx, W_dec) -> sum_j vals[b, j] * W_dec[idx[b, j]], shape (B, D); with ``tokens`` (E,) a flat
    code: vals and idx (E,), token by token, token b's entries from ``offsets[b]`` on.

    With ``tangent``, the weight gradient of each decoder row loses its component along that
    (unit-norm) row, the projection that keeps rows on the unit sphere. The radial components come
    from the per-entry dot products the value gradient computes anyway, so it costs no pass over W_dec.
    ``low_precision``: the decode and the weight gradient from bf16 operands (float32 sums, then one rounding
    to bf16, as autocast's); the value gradient stays float32 (torch's sampled product has no bf16 form).
    """

    @staticmethod
    def forward(
        ctx: Any,  # noqa: ANN401
        vals: Tensor,
        idx: Tensor,
        w_dec: Tensor,
        tangent: bool = False,
        offsets: Tensor | None = None,
        tokens: Tensor | None = None,
        low_precision: bool = False,
    ) -> Tensor:
        if tokens is None:
            offsets, tokens = padded_bags(idx.shape[0], idx.shape[1], idx.device)
        ctx.save_for_backward(vals, idx, w_dec, offsets, tokens)
        ctx.tangent, ctx.low_precision = tangent, low_precision
        dtype = w_dec.dtype
        if low_precision:  # bf16 rows and weights, summed in float32: half the bytes gathered, 1.7x on a CPU core
            w_dec, vals = w_dec.bfloat16(), vals.bfloat16()
        rows = F.embedding_bag(idx.reshape(-1), w_dec, offsets, per_sample_weights=vals.reshape(-1), mode="sum")
        return rows.to(dtype)  # (B, D)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN401
        vals, idx, w_dec, offsets, tokens = ctx.saved_tensors
        latents = idx.reshape(-1)
        grad_vals = bag_dot(grad_out, w_dec, latents, offsets, tokens).view(vals.shape)  # <g_b, W_dec[idx_bj]>
        grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w = sparse_t_matmul(latents, vals, w_dec.shape[0], grad_out, tokens, ctx.low_precision)  # (N, D)
            if ctx.tangent:
                radial = torch.zeros(w_dec.shape[0], dtype=grad_w.dtype, device=grad_w.device)
                radial.index_add_(0, latents, (vals * grad_vals).reshape(-1))  # (N,) = <grad_w[n], W_dec[n]>
                grad_w.addcmul_(radial[:, None], w_dec, value=-1)
        return (grad_vals if ctx.needs_input_grad[0] else None), None, grad_w, None, None, None, None
