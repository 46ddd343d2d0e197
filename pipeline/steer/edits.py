"""Latent edits: which latent of the SAE, what to do to it, and at which token positions.

1592=scale:0       z_i <- 0 * z_i      (ablate the feature; scale:1 changes nothing)
77=add:2.5         z_i <- z_i + 2.5
77=set:4           z_i <- 4            (clamp, wherever the edit applies)
77=direction:4     add 4 * a_max(i) * d_i to the residual stream, a_max(i) = the feature's largest
                   activation in the run's feature table (1 when there is none)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.infra.errors import UserError

KINDS = ("scale", "add", "set", "direction")
POSITIONS = ("all", "prompt", "generated", "last")


@dataclass(frozen=True)
class Edit:
    """One change to one latent."""

    latent: int  # latent id in the SAE
    kind: str  # scale | add | set | direction
    value: float  # the factor, the amount, the clamp value, or the direction's strength

    def new_value(self, old: Tensor, a_max: float) -> Tensor:
        """The latent's edited activation given its current one ``old`` (M,)."""
        if self.kind == "scale":
            return old * self.value
        if self.kind == "set":
            return torch.full_like(old, self.value)
        step = self.value * (a_max if self.kind == "direction" else 1.0)
        return old + step


def parse_edit(text: str, n_latents: int) -> Edit:
    """``"1592=scale:0"`` -> ``Edit(1592, "scale", 0.0)``, with one clear error for anything else."""
    latent, _, rest = text.partition("=")
    kind, _, value = rest.partition(":")
    try:
        edit = Edit(int(latent), kind.strip(), float(value))
    except ValueError:
        raise UserError(
            f"cannot read --feature {text!r}: write LATENT=KIND:VALUE, e.g. 1592=scale:0 (kinds: {', '.join(KINDS)})."
        ) from None
    if edit.kind not in KINDS:
        raise UserError(f"unknown edit kind {edit.kind!r} in --feature {text!r}; use one of {', '.join(KINDS)}.")
    if not math.isfinite(edit.value):
        raise UserError(f"--feature {text!r}: the strength must be a finite number.")
    if not 0 <= edit.latent < n_latents:
        raise UserError(f"--feature {text!r}: latent {edit.latent} is out of range; this SAE has 0..{n_latents - 1}.")
    return edit


@dataclass(frozen=True)
class Positions:
    """The token positions an edit applies to: all, prompt, generated, last (prompt token) or indices."""

    kind: str = "all"
    indices: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Positions:
        if text in POSITIONS:
            return cls(text)
        try:
            indices = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise UserError(
                f"cannot read --positions {text!r}: use {', '.join(POSITIONS)} or comma-separated indices."
            ) from None
        if min(indices) < 0:
            raise UserError(
                f"--positions {text}: positions count from 0 (the first prompt token) and cannot be negative; "
                "use `last` for the prompt's last token."
            )
        return cls("indices", indices)

    def mask(self, start: int, length: int, prompt_len: int, device: torch.device) -> Tensor:
        """(length,) bool: which of the absolute positions start .. start + length - 1 are edited."""
        pos = torch.arange(start, start + length, device=device)
        if self.kind == "all":
            return torch.ones(length, dtype=torch.bool, device=device)
        if self.kind == "prompt":
            return pos < prompt_len
        if self.kind == "generated":
            return pos >= prompt_len
        if self.kind == "last":
            return pos == prompt_len - 1
        return torch.isin(pos, torch.tensor(self.indices, device=device))
