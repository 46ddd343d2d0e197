"""Editing latents inside the running model, exactly.

A target's edits become one change of the code per edited position (:func:`latent_change`), applied by
:mod:`pipeline.live.edit` in either mode: ``delta`` (h + s * W^T (z' - z): no edit, or scale 1, is h
exactly) or ``replace`` (the edited reconstruction). Hooks are removed in ``finally``.

Routed SAEs (RouteSAE, hard routing): a clean pass of the same tokens gives each token its layer and
weight (:mod:`pipeline.live.routing`); edits land at each token's routed layer only. Routing needs every
routed layer of a token before the first of them runs, so routed generation recomputes the whole
sequence each step (no KV cache): slower, and exact.

Transcoders edit their MLP's output (the term block L adds to the residual stream): a latent's write
direction is its decoder row there, mapped back by the MLP output's scale (:func:`pipeline.live.edit.edit_mlp_rows`).

Special-token positions (BOS, EOS, pad) are never edited (:func:`pipeline.live.splice.real_positions`).
The hooks read each forward's token ids from the input embedding's own input, so this holds during
KV-cached generation too. Every edited forward checks that its logits are finite: an edit too large for
the model's numbers is one clear error, never an empty or garbage continuation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from pipeline.infra.errors import UserError
from pipeline.live.edit import Change, CodeEdit, EditSpec, Mode, Site, edit_mlp_rows, edit_rows
from pipeline.live.routing import route_choice
from pipeline.live.splice import Edits, mlp_edit, real_positions, site_edits, spliced
from pipeline.llm.hooks import MlpOut, replacing
from pipeline.sae.interface import Latents
from pipeline.steer.edits import Edit, Positions


@dataclass
class Target:
    """The edits of one SAE: at its layer, or at each token's routed layer (a routed SAE)."""

    site: Site  # the SAE, its layer and the cache's normalization
    edits: list[Edit]
    special: frozenset[int]  # token ids never edited (BOS, EOS, pad: attention sinks with huge norms)
    a_max: dict[int, float] = field(default_factory=dict)  # latent -> largest activation (direction edits)

    def spec(self, mode: Mode | str) -> EditSpec:
        """The edit of the code in ``mode``."""
        return EditSpec(Mode(mode), latent_change(self))


@dataclass
class Tally:
    """How many token positions edits landed on (a position counts once per forward that edits it)."""

    positions: int = 0


def check_finite(logits: Tensor, target: Target) -> None:
    """One clear error when an edit pushed the model past its number range (inf / NaN logits)."""
    if not bool(torch.isfinite(logits).all()):
        edits = " ".join(f"{e.latent}={e.kind}:{e.value:g}" for e in target.edits)
        raise UserError(
            f"the edit {edits} overflows the model's numbers (its logits become inf / NaN), so the edited text "
            "would be garbage; use a smaller value (activations are of the order of the feature's a_max)."
        )


def latent_change(target: Target) -> CodeEdit:
    """z' - z on the edited latents, from a sparse code (M, k): (M, F) values on the F edited latents."""

    def change(code: Tensor | Latents) -> Change:
        assert isinstance(code, Latents), "steering edits the sparse code"
        columns = []
        for edit in target.edits:
            old = (code.acts * (code.indices == edit.latent)).sum(-1)  # (M,)
            columns.append(edit.new_value(old, target.a_max.get(edit.latent, 1.0)) - old)
        ids = torch.tensor([e.latent for e in target.edits], dtype=torch.long, device=code.acts.device)
        return Change(torch.stack(columns, dim=1), ids)  # (M, F), (F,)

    return change


@contextmanager
def steering(
    model: nn.Module,
    blocks: nn.ModuleList,
    targets: list[Target],
    mode: Mode | str,
    positions: Positions,
    prompt_len: int,
) -> Iterator[Tally]:
    """Apply every target's edits during one `generate` (or one forward) of a single sequence; yields a
    :class:`Tally` of the positions edited.

    Positions are absolute: the first call sees the prompt, each later call (KV cache) one new token.
    """
    seen = {id(t): 0 for t in targets}
    tokens: list[Tensor] = []  # the token ids (B, T) of the forward running now
    tally = Tally()

    def read_tokens(module: nn.Module, args: tuple[Any, ...]) -> None:
        tokens[:] = [args[0]]

    def landing(target: Target, length: int, device: torch.device) -> Tensor:
        """The positions (B, T) of this forward's ``length`` tokens the target edits, counted into the tally."""
        start = seen[id(target)]
        seen[id(target)] = start + length
        where = positions.mask(start, length, prompt_len, device)[None]  # (1, T)
        where = where & real_positions(tokens[0], target.special)  # (B, T): never a special token
        tally.positions += int(where.sum())
        return where

    def make_edit(target: Target) -> Edits:
        """The target's hook: block L's input, or (a transcoder) block L's MLP output."""
        assert not target.site.routed, "a routed SAE edits through routed_logits / routed_generate"
        spec = target.spec(mode)
        if target.site.transcodes:  # its latents write into the MLP's output, the term block L adds

            def edit_mlp(x_in: Tensor, out: Tensor) -> Tensor:  # (B, T, D) each
                where = landing(target, out.shape[1], out.device)
                with torch.no_grad():
                    return mlp_edit(where, lambda a, b: edit_mlp_rows(a, b, target.site, spec))(x_in, out)

            return {MlpOut(target.site.layer): edit_mlp}

        def edit(h: Tensor) -> Tensor:  # (B, T, D)
            where = landing(target, h.shape[1], h.device)
            with torch.no_grad():  # steering never differentiates through an edit
                return spliced(h, where, lambda rows: edit_rows(rows, target.site, spec))

        return {target.site.layer: edit}

    def check(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if tally.positions:
            check_finite(output.logits, targets[0])

    with ExitStack() as stack:
        embedding = cast(nn.Module, model.get_input_embeddings())  # type: ignore[operator]
        stack.callback(embedding.register_forward_pre_hook(read_tokens).remove)
        stack.callback(model.register_forward_hook(check).remove)
        for target in targets:  # one context each: two targets may edit one layer
            stack.enter_context(replacing(blocks, make_edit(target)))
        yield tally


@torch.no_grad()
def routed_logits(
    model: nn.Module,
    blocks: nn.ModuleList,
    target: Target,
    mode: Mode | str,
    positions: Positions,
    tokens: Tensor,
    prompt_len: int,
    tally: Tally | None = None,
) -> Tensor:
    """Logits (B, T, V) of ``tokens`` with a routed SAE's edits applied at each token's routed layer
    (counted into ``tally`` when given); no edits: the clean model."""
    assert target.site.routed, "routed_logits needs a routed SAE's target"
    where = positions.mask(0, tokens.shape[1], prompt_len, tokens.device)[None]  # (1, T)
    where = where & real_positions(tokens, target.special)  # (B, T): never a special token
    edits = {}
    if target.edits and bool(where.any()):
        edits = site_edits(target.site, where, target.spec(mode), route_choice(model, blocks, target.site, tokens))
    with replacing(blocks, edits):
        logits = model(input_ids=tokens).logits  # (B, T, V)
    if edits:
        check_finite(logits, target)
        if tally is not None:
            tally.positions += int(where.sum())
    return logits


@torch.no_grad()
def routed_generate(
    model: nn.Module,
    blocks: nn.ModuleList,
    target: Target,
    mode: Mode | str,
    positions: Positions,
    ids: Tensor,
    options: tuple[int, bool, float, int],
    tally: Tally | None = None,
) -> Tensor:
    """Generation (1, T + new) with routed edits; options = (max_new_tokens, sample, temperature, seed);
    the edited positions of every step are counted into ``tally`` when given."""
    max_new_tokens, sample, temperature, seed = options
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    eos = getattr(model.generation_config, "eos_token_id", None)
    seq = ids
    for _ in range(max_new_tokens):
        logits = routed_logits(model, blocks, target, mode, positions, seq, ids.shape[1], tally)  # (1, T', V)
        logits = logits[:, -1].float()  # (1, V)
        if sample:
            token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)  # (1, 1)
        else:
            token = logits.argmax(-1, keepdim=True)  # (1, 1)
        seq = torch.cat([seq, token], dim=1)
        if eos is not None and int(token) in ([eos] if isinstance(eos, int) else eos):
            break
    return seq
