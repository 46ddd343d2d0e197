"""Device and precision choice: CUDA when present, bf16 where the hardware has it."""

from __future__ import annotations

import ctypes
import sys

import torch

from pipeline.infra.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an explicit ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for a GPU, but torch sees none; use --device cpu or auto.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a CUDA GPU that supports it, float32 otherwise (exact CPU reference)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a torch dtype, as used in specs and configs."""
    return str(dtype).removeprefix("torch.")


_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Keep freed memory in the process heap instead of returning it to the OS (glibc, Linux).

    glibc serves blocks above 32 MiB with mmap and unmaps them on free, so every training step's
    large temporaries (B x N pre-activations, N x D gradients) pay page faults again; on a 2-core
    CPU that is ~15 % of a TopK step. Disabling mmap and trimming makes freed blocks reusable.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (musl, ...): nothing to tune
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter ids from <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)
    _MALLOC_TUNED = True
