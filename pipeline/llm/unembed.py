"""The model's readout: the unembedding with the final norm's per-dimension scale folded in.

A direction d added to the last residual stream reaches the logits as roughly ``W_U (g * d)`` where g
is the final norm's weight (RMSNorm/LayerNorm also divide by the token's scale, which is positive
and shared by all tokens of the vocabulary, so it does not change which tokens a direction
promotes). This is the "logit lens" of a decoder direction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.infra.errors import UserError

# Where transformers keeps the final norm, by architecture family.
FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm")


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied before the unembedding, or None when the model has none we know."""
    for path in FINAL_NORMS:
        module: nn.Module | None = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Module):
            return module
    return None


@torch.no_grad()
def unembedding(model: nn.Module) -> Tensor:
    """(V, D) float32: row t maps a residual direction to token t's logit, final norm scale folded in."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise UserError(f"{type(model).__name__} has no output embedding; logit effects need a causal LM head.")
    weight = head.weight.float()  # (V, D)
    norm = final_norm(model)
    gain = getattr(norm, "weight", None)
    if isinstance(gain, Tensor):
        # Gemma's RMSNorm multiplies by (1 + weight); every other family by weight.
        scale = 1 + gain.float() if type(norm).__name__.startswith("Gemma") else gain.float()  # (D,)
        weight = weight * scale
    return weight
