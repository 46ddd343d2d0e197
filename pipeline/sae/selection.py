"""Which latents a TopK code keeps: the encoder GEMM (shared by a sweep's SAEs reading one layer) and a top-k over
its rows tuned for the CPU, with the scratch buffers and precision choice they run in.

:mod:`pipeline.sae.kernels` trains on what is selected here; BatchTopK's selection and AuxK's sparse form start
from the same GEMM.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

GROUP = 4  # two-stage top-k: group maxima over GROUP strided columns, then exact top-k inside (4 beat 8, 16)


def use_low_precision(device: torch.device, precision: str) -> bool:
    """Whether training's GEMMs and sparse products take bf16 operands: CUDA with bf16, or a CPU with AMX /
    AVX512-BF16 (``precision`` auto; float32 | bfloat16 decide)."""
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
# CUDA: the selection GEMM's inner size (d + 2 bias columns) padded with zeros to a multiple of this. On the H200
# K = 578 (d = 576: rows not 16-byte aligned) ran cuBLAS's sm75 fallback, cutlass_75_tensorop_bf16_s1688gemm, at
# ~110 TFLOP/s (benchmarks/RESULTS.md, 2026-12-04 17:40; the padded GEMM is not measured there yet). On a CPU core
# padding gained nothing (K 578 / 584: 97.5 / 98.2 ms, 4096 x 4096 x K bf16), so the CPU keeps d + 2.
GEMM_ALIGN = 8


class Selection(NamedTuple):
    """One encoder's top-k latents of a batch and their pre-activations, as the selection GEMM found them."""

    indices: Tensor  # (B, k) latent indices
    pre: Tensor  # (B, k) W_enc (x - b_dec) + b_enc there, in the GEMM's dtype (bf16 when low precision)


def gemm_width(d: int, padded: bool) -> int:
    """The selection GEMM's inner size for inputs of width ``d``: d and the two bias columns, then (``padded``,
    CUDA's form) zero columns up to a multiple of GEMM_ALIGN."""
    return -(-(d + 2) // GEMM_ALIGN) * GEMM_ALIGN if padded else d + 2


def encoder_preacts(
    x: Tensor, encoders: Sequence[Encoder], low_precision: bool, cpu_tuned: bool | None = None
) -> Tensor:
    """b_enc + (x - b_dec) @ W_enc^T of every encoder, side by side: (B, sum of N); bf16 when ``low_precision``.

    One GEMM serves several SAEs reading the same ``x`` (the members of a sweep). The input is centered once,
    on the first encoder's b_dec, and each encoder's own centering folds into its bias:
    W (x - b_dec) + b_enc = W (x - c) + (b_enc - W (b_dec - c)). Centering before the bf16 rounding keeps
    that rounding relative to x - b_dec rather than to x (whose mean is about as large as its spread on LLM
    hidden states), exactly so for the first encoder and nearly for the others (every b_dec starts at the
    data mean). Biases ride inside the GEMM as two extra input columns of ones, the bias's bf16 rounding and
    what it lost (adding it afterwards is one more pass over the B x N matrix); on CUDA (``cpu_tuned`` False)
    zero columns follow, up to GEMM_ALIGN. Every operand lives in a reused buffer.
    """
    rows, d = x.shape
    dtype = torch.bfloat16 if low_precision else x.dtype
    anchor = encoders[0].b_dec  # (D,)
    width = gemm_width(d, padded=not cpu_path(x, cpu_tuned))
    weight = workspace("w_aug", (sum(e.w_enc.shape[0] for e in encoders), width), dtype, x.device)  # [W | b | b' | 0]
    start = 0
    with torch.no_grad():
        for enc in encoders:
            block = weight[start : start + enc.w_enc.shape[0]]  # (N, width)
            block[:, :d].copy_(enc.w_enc)
            bias_columns(block[:, d : d + 2], torch.addmv(enc.b_enc, enc.w_enc, enc.b_dec - anchor, alpha=-1))
            block[:, d + 2 :] = 0  # the buffer is reused: the padding must be zeros now, whatever it held
            start += enc.w_enc.shape[0]
        inputs = workspace("x_aug", (rows, width), dtype, x.device)  # [x - c | 1 | 1 | 0]
        torch.sub(x, anchor, out=inputs[:, :d])
        inputs[:, d : d + 2] = 1
        inputs[:, d + 2 :] = 0
        return torch.mm(inputs, weight.t(), out=workspace("pre", (rows, start), dtype, x.device))


def bias_columns(columns: Tensor, bias: Tensor) -> None:
    """Write ``bias`` (N,) into two GEMM weight columns (N, 2) whose sum holds it to about 2^-16 in bf16: its
    rounding to the columns' dtype and what that rounding lost (0 in float32)."""
    columns[:, 0].copy_(bias)
    columns[:, 1].copy_(bias - columns[:, 0].to(bias.dtype))


def select_topk(x: Tensor, encoders: Sequence[Encoder], low_precision: bool) -> list[Selection]:
    """Each encoder's top-k latents of ``x`` (B, D) and their pre-activations, from GEMMs shared by up to
    FUSE_COLUMNS latents; each SAE's selection is taken on its own slice, so it is the one it would make alone."""
    chosen: list[Selection] = []
    batch: list[Encoder] = []
    for enc in [*encoders, None]:
        width = sum(e.w_enc.shape[0] for e in batch)
        if batch and (enc is None or width + enc.w_enc.shape[0] > FUSE_COLUMNS):
            pre = encoder_preacts(x, batch, low_precision)  # (B, width), a reused buffer
            offsets = itertools.accumulate((e.w_enc.shape[0] for e in batch), initial=0)
            chosen += [pick(pre[:, a : a + e.w_enc.shape[0]], e.k) for a, e in zip(offsets, batch)]
            batch = []
        if enc is not None:
            batch.append(enc)
    return chosen


def pick(pre: Tensor, k: int) -> Selection:
    """The top ``k`` of each row of ``pre`` (B, N) with their values (new tensors, not views of the reused buffer)."""
    values, indices = top_k(pre, k)  # (B, k) each
    return Selection(indices, values)


def cpu_path(tensor: Tensor, cpu_tuned: bool | None) -> bool:
    """Whether a kernel here takes its CPU-tuned form: as ``cpu_tuned`` says, else when ``tensor`` is on the CPU
    (tests ask for either form on the CPU)."""
    return tensor.device.type == "cpu" if cpu_tuned is None else cpu_tuned


def top_k(pre: Tensor, k: int, cpu_tuned: bool | None = None) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of ``pre`` (B, N) and their indices, each (B, k), unsorted, exact up to ties.

    ``cpu_tuned`` (default: when ``pre`` is on the CPU) takes two stages, applied recursively: the max
    over ``GROUP`` strided columns (a vectorized elementwise max), the top-k of those group maxima,
    then the top-k among the k*GROUP candidates' values (gathered in place: no index tensor of them). Every
    true top-k entry lies in one of the k best groups, so the result equals ``pre.topk(k)``. The top-ks compare
    :func:`ordered_bits` and the values are read back from the winning keys, not gathered again from ``pre``
    (a strided read of the whole (B, N) buffer: 4.5 ms at 4096 x 4096 bf16 and k 128 on one core). On one CPU
    core 1.7-2.3x faster than ``pre.topk`` at 4096-16384 latents and k 32-128 (1.3-1.7x with groups of 8
    comparing floats). Elsewhere (CUDA) plain ``torch.topk``, whose radix select is already fast there.
    """
    rows, width = pre.shape
    cpu_tuned = cpu_path(pre, cpu_tuned)
    if not cpu_tuned:
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return values, indices
    if width % GROUP or width < 4 * k * GROUP:
        keys, indices = ordered_bits(pre).topk(k, dim=-1, sorted=False)
        return from_ordered_bits(keys, pre.dtype), indices
    stride = width // GROUP
    grouped = pre.view(rows, GROUP, stride)  # group m = columns {m + g*stride}
    _, best = top_k(grouped.amax(dim=1), k, cpu_tuned)  # (B, k) the best groups
    candidates = grouped.gather(2, best[:, None].expand(rows, GROUP, k)).view(rows, GROUP * k)  # (B, G*k) values
    keys, chosen = ordered_bits(candidates).topk(k, dim=-1, sorted=False)  # (B, k) at g*k + j: best[b, j], g
    indices = best.gather(1, chosen % k) + torch.div(chosen, k, rounding_mode="floor") * stride
    return from_ordered_bits(keys, pre.dtype), indices


def ordered_bits(values: Tensor) -> Tensor:
    """Integers ordered as the floats ``values`` are (not NaN; -0 just below +0): torch's CPU top-k compares
    integers 1.5x faster than bf16 or float32. A float's bits read as a signed integer order the non-negative
    floats; flipping every bit but the sign of the negative ones reverses their order, below zero."""
    if not values.is_floating_point():
        return values
    return _mirror_negatives(values.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]))


def from_ordered_bits(keys: Tensor, dtype: torch.dtype) -> Tensor:
    """The values of ``dtype`` whose :func:`ordered_bits` are ``keys`` (the flip is its own inverse; integers as
    they are)."""
    return _mirror_negatives(keys).view(dtype) if dtype.is_floating_point else keys


def _mirror_negatives(bits: Tensor) -> Tensor:
    """Every bit but the sign flipped where the sign is set (signed integers holding floats' bits)."""
    return bits ^ ((bits >> (8 * bits.element_size() - 1)) & torch.iinfo(bits.dtype).max)
