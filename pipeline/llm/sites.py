"""Where in a block activations are read: the residual stream entering it, or its MLP's input and output.

resid    the residual stream entering block L (Hugging Face hidden_states[L]; SAELens
         blocks.L.hook_resid_pre): what SAEs read
mlp_in   what block L's MLP receives: the residual after attention, through the pre-MLP norm
         (TransformerLens blocks.L.ln2.hook_normalized): a transcoder's input
mlp_out  what the MLP returns, the term it adds to the residual (blocks.L.hook_mlp_out): its target
"""

from __future__ import annotations

from torch import nn

from pipeline.infra.errors import UserError

SITES = ("resid", "mlp_in", "mlp_out")
MLP_NAMES = ("mlp", "feed_forward", "ffn")  # the MLP's attribute on a block: Llama/GPT-2/NeoX/Qwen/Gemma, Mistral-likes
POST_MLP_NORMS = ("post_feedforward_layernorm",)  # Gemma 2/3: the residual receives norm(mlp(x)), not mlp(x)


def parse_sites(spec: str) -> list[str]:
    """``"resid,mlp_in,mlp_out"`` -> the sites in SITES order; resid is always among them (every stage reads it)."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    unknown = [name for name in names if name not in SITES]
    if unknown or "resid" not in names:
        raise UserError(
            f"--sites {spec!r}: use resid, optionally with mlp_in and/or mlp_out (e.g. resid,mlp_in,mlp_out); "
            + (f"unknown: {', '.join(unknown)}." if unknown else "resid is always stored.")
        )
    return [site for site in SITES if site in names]


def find_mlp(block: nn.Module) -> nn.Module:
    """The MLP of a transformer block, whose output is exactly what the block adds to its residual."""
    for name in POST_MLP_NORMS:
        if hasattr(block, name):
            raise UserError(
                f"{type(block).__name__} normalizes its MLP's output ({name}) before adding it to the residual; "
                "mlp_out would not be the term added. Cache --sites resid only for this model."
            )
    for name in MLP_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UserError(
        f"cannot find the MLP of {type(block).__name__} (no attribute {' / '.join(MLP_NAMES)}); "
        "cache --sites resid only, or report the architecture."
    )
