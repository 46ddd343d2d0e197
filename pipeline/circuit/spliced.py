"""The model with SAEs spliced in at a few residual layers, each latent behind a mask.

At a site (an SAE at layer L) the live input h of block L is normalized as the cache was (x, per-token
scale s) and encoded to its dense code z (``SAE.dense_code``, differentiable in x, any architecture). A
latent's kept share ``keep`` in [0, 1] mixes its live value with its ablated value a (its mean over the
train patch prompts, or zero), and the change reaches the model as a delta edit (:mod:`pipeline.live.edit`):

    z' = keep * z + (1 - keep) * a          h' = h + s * W^T (z' - z)

Only the change in the code reaches the residual stream, so the SAE's reconstruction error x - x_hat
stays in as an always-on node: with every latent kept, z' = z and h' = h exactly (the clean model).
Special-token positions (those the cache skipped) are left alone. Hooks are removed in ``finally``.

Nothing below the first site changes between forwards on the same prompts, so each batch runs the model
once per prompt set up to the first site (its stem, kept in the batch) and every later forward runs
only the blocks from there up (:mod:`pipeline.llm.replay`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, cast

import torch
from torch import Tensor, nn

from pipeline.circuit.tasks import Pair
from pipeline.infra.errors import UserError
from pipeline.live.edit import Change, CodeEdit, EditSpec, Mode, Site
from pipeline.live.splice import Edits, real_positions, site_edits
from pipeline.llm.hooks import replacing
from pipeline.llm.replay import Stem, resume, stem
from pipeline.sae.interface import Latents


class Batch(NamedTuple):
    """Pairs of one prompt length, as tensors."""

    clean: Tensor  # (B, T) clean prefixes
    patch: Tensor  # (B, T) patch prefixes
    real: Tensor  # (B, T) positions the SAEs read (not special tokens)
    clean_answer: Tensor  # (B,)
    patch_answer: Tensor  # (B,)
    stems: dict[tuple[str, int], Stem | None]  # (side, first site layer) -> the forward below it, made once


Side = Literal["clean", "patch"]


class Masking(NamedTuple):
    """Per site: the kept share of each latent and the value it takes where not kept."""

    keep: list[Tensor]  # (N,) each, in [0, 1]; or (G, N): G masks for a batch tiled G times (see ``tiled``)
    ablate: list[Tensor]  # (N,) each


def single_layer(site: Site) -> Site:
    """``site``, refused when its SAE is routed: a routed SAE (RouteSAE) reads each token at the layer its router
    picks from the clean forward, so one of its latents is no fixed node of the model, the router's hard choice
    has no gradient for a mask, and its error node would be spread over every routed layer."""
    if site.routed:
        raise UserError(
            f"run {site.name} is a {site.sae.cfg.arch} SAE, which routes each token to its own layer; a circuit's "
            "nodes are latents at fixed layers, so circuits are found over single-layer runs (one per layer, any "
            "architecture); train them with `sae-pipe fit --sweep layer=...`."
        )
    return site


def batches(pairs: list[Pair], size: int, special: set[int], device: torch.device) -> list[Batch]:
    """Pairs grouped by prompt length (no padding: the last position is the answer's), ``size`` at most."""
    by_length: dict[int, list[Pair]] = {}
    for pair in pairs:
        by_length.setdefault(len(pair.clean), []).append(pair)
    out = []
    for group in by_length.values():
        for start in range(0, len(group), size):
            chunk = group[start : start + size]
            clean = torch.tensor([p.clean for p in chunk], device=device)  # (B, T)
            patch = torch.tensor([p.patch for p in chunk], device=device)  # (B, T)
            real = real_positions(clean, special) & real_positions(patch, special)  # (B, T): read in both runs
            out.append(
                Batch(
                    clean,
                    patch,
                    real,
                    torch.tensor([p.clean_answer for p in chunk], device=device),
                    torch.tensor([p.patch_answer for p in chunk], device=device),
                    {},
                )
            )
    return out


def tiled(batch: Batch, copies: int) -> Batch:
    """``batch`` repeated ``copies`` times along the batch dimension (copy-major), with stems of its own: one
    forward then serves ``copies`` masks, row block g under mask g."""
    return Batch(
        batch.clean.repeat(copies, 1),  # (G * B, T)
        batch.patch.repeat(copies, 1),
        batch.real.repeat(copies, 1),
        batch.clean_answer.repeat(copies),  # (G * B,)
        batch.patch_answer.repeat(copies),
        {},
    )


def position_keep(keep: Tensor, real: Tensor) -> Tensor:
    """The kept share per real position: ``keep`` (N,) as it is, or (G, N) spread over a batch tiled G times
    (rows g * B .. (g + 1) * B - 1 take mask g) as (M, N)."""
    if keep.dim() == 1:
        return keep
    rows = torch.arange(keep.shape[0], device=real.device).repeat_interleave(real.shape[0] // keep.shape[0])
    return keep[rows[:, None].expand_as(real)[real]]  # (M, N)


def masked(real: Tensor, keep: Tensor | None, ablate: Tensor | None, record: list[Tensor]) -> CodeEdit:
    """The change of a site's dense code z (M, N) at the real positions ``real`` (B, T): ``(1 - keep) * (a - z)``
    (None without a mask); every code is appended to ``record``."""

    def change(z: Tensor | Latents) -> Change | None:
        assert isinstance(z, Tensor), "a mask edits the dense code"
        record.append(z)
        if keep is None or ablate is None:
            return None
        return Change((1 - position_keep(keep, real)) * (ablate - z))  # (M, N): z' - z

    return change


def stem_of(model: nn.Module, blocks: nn.ModuleList, layer: int, batch: Batch, side: Side) -> Stem | None:
    """``side``'s forward below block ``layer``, computed on first use (with no edit in place) and kept."""
    key = (side, layer)
    if key not in batch.stems:
        batch.stems[key] = stem(model, blocks, batch.clean if side == "clean" else batch.patch, layer)
    return batch.stems[key]


def logit_diff(
    model: nn.Module,
    blocks: nn.ModuleList,
    sites: list[Site],
    side: Side,
    batch: Batch,
    masking: Masking | None = None,
    record: list[list[Tensor]] | None = None,
) -> Tensor:
    """logit(clean answer) - logit(patch answer) at the last position of ``side``'s prompts (B,), with
    ``masking`` applied (None: every latent kept); ``record`` collects each site's code (M, N) as it ran."""
    codes: list[list[Tensor]] = record if record is not None else [[] for _ in sites]
    edits: Edits = {}
    for i, site in enumerate(sites):
        keep, ablate = (masking.keep[i], masking.ablate[i]) if masking else (None, None)
        spec = EditSpec(Mode.DELTA, masked(batch.real, keep, ablate, codes[i]), dense=True)
        edits.update(site_edits(site, batch.real, spec))
    start = stem_of(model, blocks, min(s.layer for s in sites), batch, side)
    with replacing(blocks, edits):
        if start is not None:  # only the blocks from the first site up
            hidden = resume(model, blocks, start)  # (B, T, D)
        else:  # a final norm we do not know: the whole model
            tokens = batch.clean if side == "clean" else batch.patch
            hidden = cast(nn.Module, model.base_model)(input_ids=tokens, use_cache=False).last_hidden_state
    logits = answer_logits(model, hidden[:, -1], batch)  # (B, 2)
    return logits[:, 0] - logits[:, 1]


def answer_logits(model: nn.Module, last: Tensor, batch: Batch) -> Tensor:
    """(B, 2) float32 logits of each pair's clean and patch answer from the last hidden state ``last`` (B, D):
    only those two rows of the output embedding, not the whole vocabulary (a large share of a small model's
    weights read per forward)."""
    head = cast(nn.Linear, model.get_output_embeddings())  # type: ignore[operator]
    answers = torch.stack([batch.clean_answer, batch.patch_answer], dim=1)  # (B, 2)
    logits = (head.weight[answers] @ last.unsqueeze(-1)).squeeze(-1)  # (B, 2)
    if head.bias is not None:
        logits = logits + head.bias[answers]
    return logits.float()


@torch.no_grad()
def ablation_values(
    model: nn.Module, blocks: nn.ModuleList, sites: list[Site], train: list[Batch], how: str
) -> list[Tensor]:
    """Per site (N,): each latent's mean over the real positions of the train patch prompts, or zeros."""
    if how == "zero":
        return [torch.zeros(s.sae.cfg.n_latents, device=s.sae.device) for s in sites]
    record: list[list[Tensor]] = [[] for _ in sites]
    for batch in train:
        logit_diff(model, blocks, sites, "patch", batch, None, record)
    return [torch.cat(codes).mean(dim=0) for codes in record]
