"""Generation with the options `steer` exposes, and the model's context limit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.infra.errors import UserError


@torch.no_grad()
def generate(
    model: nn.Module, ids: torch.Tensor, max_new_tokens: int, sample: bool, temperature: float, seed: int
) -> torch.Tensor:
    """Greedy, or seeded sampling: the same seed for the unedited and the edited run. Returns (1, T + new)."""
    torch.manual_seed(seed)
    options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens}
    if sample:
        options["temperature"] = temperature
    pad = getattr(model.generation_config, "eos_token_id", None)
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **options)  # type: ignore[operator]


def check_length(model: nn.Module, length: int) -> None:
    """One clear error when a prompt plus its continuation exceeds the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and length > limit:
        raise UserError(
            f"the prompt plus --max-new-tokens is {length} tokens, longer than the model's {limit} positions; "
            "shorten the prompt or lower --max-new-tokens."
        )
