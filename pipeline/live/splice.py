"""Splicing an SAE into the running LLM: the hooks that apply an edit (:mod:`pipeline.live.edit`) to the real
positions of a forward, at the SAE's layer or, for a hard-routing SAE, at each token's routed layer.

Real positions are the ones the SAE was trained on: the cache leaves special tokens (BOS, EOS, pad:
attention sinks with huge norms) out, so every edit skips them (:func:`real_positions`). The router,
run on the clean activations, picks one layer per token (:mod:`pipeline.live.routing`); the token is
edited at that layer only. Evaluating a splice runs the blocks below the layer once per batch
(:class:`Branches`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from pipeline.live.edit import EditSpec, Site, edit_mlp_rows, edit_rows
from pipeline.live.routing import Routing
from pipeline.llm.hooks import MlpOut, replacing
from pipeline.llm.replay import resume, stem
from pipeline.llm.unembed import final_norm

Edit = Callable[[Tensor], Tensor]  # (B, T, D) hidden state -> replacement
MlpEdit = Callable[[Tensor, Tensor], Tensor]  # (B, T, D) MLP input, its output -> the output's replacement
Edits = dict[int | MlpOut, Callable[..., Tensor]]  # block L's input (int key) or its MLP's output (MlpOut)


def logits_with(model: nn.Module, blocks: nn.ModuleList, tokens: Tensor, edits: Edits) -> Tensor:
    """Logits (B, T, V) of a forward in which block L's input h becomes ``edits[L](h)``."""
    with replacing(blocks, edits):
        return model(input_ids=tokens, use_cache=False).logits


class Branches:
    """One batch's forwards that differ only from ``layer`` up (clean, zeroed, each run spliced): the blocks
    below ``layer`` run once, in the clean forward, and every edited forward resumes from there
    (llm/replay.py). ``replay=False`` (a model whose output replay cannot rebuild) runs each one whole.
    Logits come only at the positions ``at`` (B, T) marks: the LM head, a fifth of a small model's
    forward, never runs on padding, and no (B, T, V) matrix is copied to pick the real rows."""

    def __init__(
        self, model: nn.Module, blocks: nn.ModuleList, tokens: Tensor, layer: int, replay: bool, at: Tensor
    ) -> None:
        self.model, self.blocks, self.tokens, self.at = model, blocks, tokens, at
        self.start = stem(model, blocks, tokens, layer) if replay else None
        self.head = model.get_output_embeddings()  # type: ignore[operator]

    def clean(self) -> Tensor:
        """Logits (n, V) of the unedited forward at the n marked positions."""
        if self.start is None:
            return logits_with(self.model, self.blocks, self.tokens, {})[self.at]
        return self.head(self.start.last[self.at])

    def edited(self, edits: Edits) -> Tensor:
        """Logits (n, V) with ``edits`` (at ``layer`` or above), at the marked positions."""
        if self.start is None:
            return logits_with(self.model, self.blocks, self.tokens, edits)[self.at]
        with replacing(self.blocks, edits):
            return self.head(resume(self.model, self.blocks, self.start)[self.at])


@torch.no_grad()  # a check: three forwards that need no autograd graph, whoever calls it
def replays_exactly(model: nn.Module, blocks: nn.ModuleList, tokens: Tensor, layer: int) -> bool:
    """Whether branching rebuilds this model's logits: clean and resumed-unedited logits equal a whole
    forward's (a model with logit soft-capping or scaling, or a final norm replay does not know, fails)."""
    if final_norm(model) is None or model.get_output_embeddings() is None:  # type: ignore[operator]
        return False
    everywhere = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)  # (B, T)
    branches = Branches(model, blocks, tokens, layer, replay=True, at=everywhere)
    whole = logits_with(model, blocks, tokens, {}).flatten(0, 1)  # (B * T, V)
    scale = whole.abs().max().clamp_min(1e-6)
    return all(float((b - whole).abs().max() / scale) < 1e-4 for b in (branches.clean(), branches.edited({})))


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's special token ids (BOS, EOS, pad...): positions no edit touches."""
    named = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return frozenset(tokenizer.all_special_ids) | {int(i) for i in named if i is not None}


def real_positions(tokens: Tensor, special: frozenset[int] | set[int]) -> Tensor:
    """(B, T) bool: the positions of ``tokens`` (B, T) whose token is not special (the ones the cache stored)."""
    ids = torch.tensor(sorted(special), dtype=tokens.dtype, device=tokens.device)
    return ~torch.isin(tokens, ids)


def spliced(h: Tensor, where: Tensor, rows: Callable[[Tensor], Tensor]) -> Tensor:
    """``h`` (B, T, D) with its rows at ``where`` (B, T) replaced by ``rows`` of them (M, D) -> (M, D)."""
    if not bool(where.any()):
        return h
    out = h.clone()
    out[where] = rows(h[where]).to(h.dtype)
    return out


def mlp_edit(where: Tensor, rows: Callable[[Tensor, Tensor], Tensor]) -> MlpEdit:
    """An MLP-output edit: the output's rows at ``where`` (B, T) become ``rows(input rows, output rows)`` (M, D)."""

    def edit(x_in: Tensor, out: Tensor) -> Tensor:
        if not bool(where.any()):
            return out
        new = out.clone()
        new[where] = rows(x_in[where], out[where]).to(out.dtype)
        return new

    return edit


class Placement(NamedTuple):
    """Where a site's edit lands in one block's input."""

    layer: int
    where: Tensor  # (B, T) the positions edited there
    weight: Tensor | None  # (B, T) routing weights (a routed SAE), else None


def placements(site: Site, mask: Tensor, routing: Routing | None) -> list[Placement]:
    """The site's layer with ``mask`` (B, T); with ``routing``, each routed layer with the masked tokens
    routed there (other positions stay clean)."""
    if routing is None:
        return [Placement(site.layer, mask, None)]
    return [Placement(layer, mask & (routing.choice == i), routing.weight) for i, layer in enumerate(site.layers)]


def site_edits(site: Site, mask: Tensor, spec: EditSpec, routing: Routing | None = None) -> Edits:
    """Block-input edits applying ``spec`` at the real positions ``mask`` (B, T), each token at its routed layer
    when ``routing`` is given (a routed site needs it); a transcoder's edit of its MLP's output."""
    assert routing is not None or not site.routed, f"{site.name} is routed: its edits need a Routing"
    if site.transcodes:
        return {MlpOut(site.layer): mlp_edit(mask, lambda a, b: edit_mlp_rows(a, b, site, spec))}

    def at(place: Placement) -> Edit:
        here = site._replace(layer=place.layer)
        weight = None if place.weight is None else place.weight[place.where]  # (M,)
        return lambda h: spliced(h, place.where, lambda rows: edit_rows(rows, here, spec, weight))

    return {place.layer: at(place) for place in placements(site, mask, routing)}


def zero_edits(site: Site, mask: Tensor, routing: Routing | None = None) -> Edits:
    """Zero the residual stream at the site's masked positions (each at its routed layer, with ``routing``); a
    transcoder's baseline zeroes its MLP's output there instead (the MLP ablated)."""
    if site.transcodes:
        return {MlpOut(site.layer): mlp_edit(mask, lambda a, b: torch.zeros_like(b))}

    def zeroing(where: Tensor) -> Edit:
        return lambda h: spliced(h, where, torch.zeros_like)

    return {place.layer: zeroing(place.where) for place in placements(site, mask, routing)}
