"""Sparse building blocks of TopK training, as autograd functions.

The dense work is one GEMM (``x @ W_enc.T``); everything after the top-k selection touches only
``k`` latents per token. Gradients never form a dense (tokens x latents) matrix:

* encoder weight grad ``S^T @ x`` and decoder weight grad ``S_v^T @ g`` are sparse products (:func:`sparse_t_matmul`:
  torch's embedding-bag kernel over the entries sorted by latent on the CPU, a CSR product on CUDA);
* per-entry dot products ``<a_b, W[idx_bj]>`` (:func:`bag_dot`) are a sampled dense-dense product on the
  CPU and torch's embedding-bag kernel for per-sample-weight gradients on CUDA, so no (tokens, k, D) gather
  is materialized;
* the decoder is ``embedding_bag`` (a weighted sum of k decoder rows per token).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

GROUP = 4  # two-stage top-k: group maxima over GROUP strided columns, then exact top-k inside (4 beat 8, 16)


def use_low_precision(device: torch.device, precision: str) -> bool:
    """Whether the encoder GEMM runs in bf16: CUDA with bf16, or a CPU with AMX / AVX512-BF16."""
    if precision == "float32":
        return False
    if precision == "bfloat16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's capability queries
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


_WORKSPACE: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}


def workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable scratch tensor: large temporaries allocated fresh every step cost page faults on CPU.

    One buffer per name, grown to the largest shape asked for, so changing shapes (AuxK over a varying
    number of dead latents, short last batches) reuse it instead of piling up buffers.
    """
    size = math.prod(shape)
    key = (name, dtype, device)
    if key not in _WORKSPACE or _WORKSPACE[key].numel() < size:
        _WORKSPACE[key] = torch.empty(size, dtype=dtype, device=device)
    return _WORKSPACE[key][:size].view(shape)


class Encoder(NamedTuple):
    """What selecting one SAE's top k needs: its encoder, biases and k."""

    w_enc: Tensor  # (N, D)
    b_enc: Tensor  # (N,)
    b_dec: Tensor  # (D,) pre-bias, subtracted from the input
    k: int


FUSE_COLUMNS = 65536  # latents per shared GEMM: caps the (B, sum N) pre-activation buffer of a large sweep


def encoder_preacts(x: Tensor, encoders: Sequence[Encoder], low_precision: bool) -> Tensor:
    """b_enc + (x - b_dec) @ W_enc^T of every encoder, side by side: (B, sum of N); bf16 when ``low_precision``.

    One GEMM serves several SAEs reading the same ``x`` (the members of a sweep), so the input is not
    centered per SAE: W (x - b_dec) + b_enc = W x + (b_enc - W b_dec), the last term a bias per latent.
    Biases ride inside the GEMM as an extra input column of ones (adding them afterwards is one more pass
    over the B x N matrix), and every operand lives in a reused buffer.
    """
    rows, d = x.shape
    dtype = torch.bfloat16 if low_precision else x.dtype
    weight = workspace("w_aug", (sum(e.w_enc.shape[0] for e in encoders), d + 1), dtype, x.device)  # [W | b]
    start = 0
    with torch.no_grad():
        for enc in encoders:
            block = weight[start : start + enc.w_enc.shape[0]]  # (N, D + 1)
            block[:, :d].copy_(enc.w_enc)
            block[:, d].copy_(torch.addmv(enc.b_enc, enc.w_enc, enc.b_dec, alpha=-1))
            start += enc.w_enc.shape[0]
        inputs = workspace("x_aug", (rows, d + 1), dtype, x.device)  # [x | 1]
        inputs[:, :d].copy_(x)
        inputs[:, d] = 1
        return torch.mm(inputs, weight.t(), out=workspace("pre", (rows, start), dtype, x.device))


def select_topk(x: Tensor, encoders: Sequence[Encoder], low_precision: bool) -> list[Tensor]:
    """Each encoder's top-k latent indices (B, k) on ``x`` (B, D), from GEMMs shared by up to FUSE_COLUMNS
    latents; each SAE's selection is taken on its own slice, so it is the one it would make alone."""
    chosen: list[Tensor] = []
    batch: list[Encoder] = []
    for enc in [*encoders, None]:
        width = sum(e.w_enc.shape[0] for e in batch)
        if batch and (enc is None or width + enc.w_enc.shape[0] > FUSE_COLUMNS):
            pre = encoder_preacts(x, batch, low_precision)  # (B, width), a reused buffer
            offsets = itertools.accumulate((e.w_enc.shape[0] for e in batch), initial=0)
            chosen += [topk_indices(pre[:, a : a + e.w_enc.shape[0]], e.k) for a, e in zip(offsets, batch)]
            batch = []
        if enc is not None:
            batch.append(enc)
    return chosen


def cpu_path(tensor: Tensor, cpu_tuned: bool | None) -> bool:
    """Whether a kernel here takes its CPU-tuned form: as ``cpu_tuned`` says, else when ``tensor`` is on the CPU
    (tests ask for either form on the CPU)."""
    return tensor.device.type == "cpu" if cpu_tuned is None else cpu_tuned


def topk_indices(pre: Tensor, k: int, cpu_tuned: bool | None = None) -> Tensor:
    """Indices (B, k) of the k largest entries per row, exact up to ties.

    ``cpu_tuned`` (default: when ``pre`` is on the CPU) takes two stages, applied recursively: the max
    over ``GROUP`` strided columns (a vectorized elementwise max), the top-k of those group maxima,
    then the top-k among the k*GROUP candidates' values (gathered in place: no index tensor of them). Every
    true top-k entry lies in one of the k best groups, so the result equals ``pre.topk(k)``. The top-ks compare
    :func:`ordered_bits`. On one CPU core 1.7-2.3x faster than ``pre.topk`` at 4096-16384 latents and k 32-128
    (1.3-1.7x with groups of 8 comparing floats).
    Elsewhere (CUDA) plain ``torch.topk``, whose radix select is already fast there.
    """
    rows, width = pre.shape
    cpu_tuned = cpu_path(pre, cpu_tuned)
    if not cpu_tuned:
        return pre.topk(k, dim=-1, sorted=False).indices
    if width % GROUP or width < 4 * k * GROUP:
        return ordered_bits(pre).topk(k, dim=-1, sorted=False).indices
    stride = width // GROUP
    grouped = pre.view(rows, GROUP, stride)  # group m = columns {m + g*stride}
    best = topk_indices(grouped.amax(dim=1), k, cpu_tuned)  # (B, k) the best groups
    candidates = grouped.gather(2, best[:, None].expand(rows, GROUP, k)).view(rows, GROUP * k)  # (B, G*k) values
    chosen = ordered_bits(candidates).topk(k, dim=-1, sorted=False).indices  # (B, k) at g*k + j: best[b, j], g
    return best.gather(1, chosen % k) + torch.div(chosen, k, rounding_mode="floor") * stride


def ordered_bits(values: Tensor) -> Tensor:
    """Integers ordered as the floats ``values`` are (not NaN; -0 just below +0): torch's CPU top-k compares
    integers 1.5x faster than bf16 or float32. A float's bits read as a signed integer order the non-negative
    floats; flipping every bit but the sign of the negative ones reverses their order, below zero."""
    if not values.is_floating_point():
        return values
    bits = values.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()])
    return bits ^ ((bits >> (8 * values.element_size() - 1)) & torch.iinfo(bits.dtype).max)


def rowwise_dot(a: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """out[b, j] = <a[b], weight[idx[b, j]]>, shape (B, k), without a (B, k, D) gather."""
    rows, k = idx.shape
    return bag_dot(a, weight, idx.reshape(-1), *padded_bags(rows, k, idx.device)).view(rows, k)


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
    # a stable sort of int32 keys is torch's radix sort on the CPU: 2x its argsort of int64 at 0.5M entries, and
    # it leaves each row's columns (tokens) in ascending order
    order = torch.sort(flat.int(), stable=True).indices
    # int32 positions (both kernels take them): 8 % faster than int64 in the embedding bag at 0.5M entries
    crow = torch.zeros(n_rows + 1, dtype=torch.int32, device=flat.device)  # each latent's first sorted entry
    crow[1:] = torch.bincount(flat, minlength=n_rows).cumsum(0)
    cols = (torch.div(order, latents.shape[1], rounding_mode="floor") if tokens is None else tokens[order]).int()
    weights = values.reshape(-1)[order].to(dense.dtype)
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

    The selection may use a bf16 GEMM, or come in as ``idx`` (chosen by :func:`select_topk` for a whole
    sweep); the returned values are recomputed exactly in float32. ``low_precision`` also gives W_enc's
    gradient from bf16 operands (:func:`sparse_t_matmul`).
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
        idx: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        centered = x - b_dec  # (B, D)
        if idx is None:  # not chosen already by a GEMM shared with other SAEs (select_topk)
            (idx,) = select_topk(x, [Encoder(w_enc, b_enc, b_dec, k)], low_precision)  # (B, k)
        vals = (rowwise_dot(centered, w_enc, idx) + b_enc[idx]).relu_()  # (B, k) exact float32
        ctx.save_for_backward(centered, w_enc, idx, vals)
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
    ``low_precision``: the weight gradient from bf16 operands (:func:`sparse_t_matmul`).
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
        return F.embedding_bag(idx.reshape(-1), w_dec, offsets, per_sample_weights=vals.reshape(-1), mode="sum")

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
