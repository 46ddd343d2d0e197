"""The compact stored dtype ``int8``: one byte per value and one float32 scale per token and layer.

    scale = max_i |x_i| / 127        codes = round(x / scale)  (int8)        x ~ codes * scale

Chosen over float8 e4m3 with a per-token scale by measurement on the demo cache (benchmarks/RESULTS.md,
issue 19): e4m3 reconstructs with half the error (NMSE 0.05 % against 0.09 %, both far under an SAE's
~12 % FVU), but numpy has no float8 type and torch casts it on the CPU one value at a time, so decoding
ran at 0.12-0.2 M rows/s against int8's 2.4 M: the stream would fall behind training. The largest error
per value is half a step, ``scale / 2`` (the round-trip bound the tests check).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

COMPACT = "int8"
LEVELS = 127  # symmetric: -127..127, so that -x encodes as -codes
SCALE_DTYPE = np.float32
METHOD = "int8 codes, one float32 scale per token and layer: max |x| / 127 ({split}/scale, (L, n))"


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows (..., D) as int8 codes (..., D) and their scales (...)."""
    scale = x.float().abs().amax(dim=-1) / LEVELS  # (...)
    codes = torch.round(x.float() / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None])  # (..., D)
    return codes.to(torch.int8), scale


def dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 rows (..., D) from int8 codes (..., D) and scales (...)."""
    rows = codes.astype(np.float32)  # (..., D)
    rows *= scale[..., None]
    return rows
