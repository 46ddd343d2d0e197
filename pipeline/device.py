"""Device and precision choice: CUDA when present, bf16 where the hardware has it."""

from __future__ import annotations

import torch

from pipeline.errors import UserError

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
