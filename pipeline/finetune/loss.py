"""The fine-tuning loss of one batch: the run spliced into the running model (evaluate's splice,
pipeline.live), scored by the model's own next-token distribution.

    kl   mean over real positions of KL(p_clean || p_spliced) = sum_v p_clean (log p_clean - log p_spliced)
         (the number evaluate reports as kl_per_token)
    ce   mean over real positions whose next token is real of -log p_spliced(next token)
    + mse_weight x the reconstruction's normalized MSE at the layer (the loss `fit` trained on; a transcoder's:
      of its prediction of the MLP's output, both MLP sites scaled as the cache scaled them)

The blocks below the layer run once, without a graph (llm/replay.py ``stem``); gradients reach only the
parameters that require them, the SAE's. A transcoder's MSE term reads the MLP's own input and output where the
spliced forward's MLP-output edit sees them (the edit is the only one, at that MLP, so they are the clean ones):
no second forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.live.edit import EditSpec, Mode, Site
from pipeline.live.splice import Branches, Edits, site_edits
from pipeline.live.subject import Live
from pipeline.llm.divergence import kl_rows, log_probs, next_token_log_likelihoods, reference
from pipeline.llm.hooks import MlpOut, run_to_layers
from pipeline.sae.quality import Reconstruction

# the reconstruction in place of the residual stream (a transcoder's: in place of its MLP's output)
SPLICE = EditSpec(Mode.REPLACE)


class Terms(NamedTuple):
    """One batch's loss and its parts."""

    total: Tensor  # () what is minimized
    model: Tensor  # () the KL or CE part
    mse: Tensor  # () the normalized MSE (0 when not asked for)


def batch_loss(live: Live, tokens: Tensor, mask: Tensor, loss: str, mse_weight: float, replay: bool) -> Terms:
    """The loss of ``tokens`` (B, T) with the run spliced in at the real positions ``mask`` (B, T)."""
    site = live.site
    branches = Branches(live.model, live.blocks, tokens, site.layer, replay, at=mask)
    mlp_rows: list[tuple[Tensor, Tensor]] = []
    edits = site_edits(site, mask, SPLICE)
    if site.transcodes and mse_weight > 0:
        edits = keeping_mlp_rows(edits, site.layer, mlp_rows)
    spliced = log_probs(branches.edited(edits))  # (n, V)
    if loss == "kl":
        with torch.no_grad():
            clean = reference(log_probs(branches.clean()))  # (n, V)
        model = kl_rows(clean, spliced).mean()
    else:
        model = -next_token_log_likelihoods(spliced, tokens, mask).mean()
    zero = torch.zeros((), device=tokens.device)
    mse = reconstruction_loss(site, branches, mask, mlp_rows) if mse_weight > 0 else zero
    return Terms(model + mse_weight * mse, model.detach(), mse.detach())


def keeping_mlp_rows(edits: Edits, layer: int, kept: list[tuple[Tensor, Tensor]]) -> Edits:
    """``edits`` whose edit of block ``layer``'s MLP output also appends the MLP's input and output it is given
    ((B, T, D) each, detached) to ``kept``."""
    edit = edits[MlpOut(layer)]

    def keep(x_in: Tensor, out: Tensor) -> Tensor:
        kept.append((x_in.detach(), out.detach()))
        return edit(x_in, out)

    return {**edits, MlpOut(layer): keep}


def reconstruction_loss(site: Site, branches: Branches, mask: Tensor, mlp_rows: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Normalized MSE () of the SAE on the layer's rows at the real positions, normalized as the cache was; a
    transcoder's of its MLP-output prediction from the MLP's input, both as the spliced forward's edit saw them
    (``mlp_rows``: one (input, output) pair, see keeping_mlp_rows)."""
    if site.transcodes:
        assert site.target is not None, f"{site.name} transcodes: its Site needs the MLP output's normalization"
        ((x_in, out),) = mlp_rows  # (B, T, D) each: one spliced forward, one visit of its MLP
        x, _ = site.normalizer.normalize(x_in[mask].float(), site.layer)  # (n, D)
        y, _ = site.target.normalize(out[mask].float(), site.layer)  # (n, D)
        return Reconstruction().add(y, site.sae.output(x, site.sae.encode(x)))
    if branches.start is not None:
        h = branches.start.hidden  # (B, T, D)
    else:
        with torch.no_grad():
            h = run_to_layers(branches.model, branches.blocks, branches.tokens, [site.layer])[site.layer]
    x, _ = site.normalizer.normalize(h[mask].float(), site.layer)  # (n, D)
    return Reconstruction().add(x, site.sae.decode(site.sae.encode(x)))
