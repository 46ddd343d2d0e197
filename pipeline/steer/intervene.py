"""Editing latents inside the running model, exactly.

At the SAE's layer the live activation h is normalized as the cache was (x, with per-token stats),
encoded to its code z, and the edits give z'. Two modes say what reaches the next block:

    delta    h + s * W_dec^T (z' - z)     only the change in the decoded code; everything the SAE
                                          does not edit, its reconstruction error included, passes
                                          through untouched (no edit, or scale 1: h exactly)
    replace  denorm(W_dec^T z' + b_dec)   the edited reconstruction (the RouteSAE reference's hook):
                                          the SAE's error is applied as well

s is the token's own normalization scale (its std for `standardize`; the mean cancels in a
difference). Hooks are removed in ``finally``.

RouteSAE runs (hard routing): a clean pass of the same tokens gives each token its layer l and weight
w; the SAE encodes w * x there, so the code's change is divided by w on the way back (the scaled splice
of `evaluate`). Edits land at each token's routed layer only. Routing needs every routed layer of a
token before the first of them runs, so routed generation recomputes the whole sequence each step
(no KV cache): slower, and exact.

Special-token positions (BOS, EOS, pad) are never edited: they are attention sinks with huge norms that
the SAE never saw (the cache leaves them out, `evaluate` and `circuit` skip them). The hooks read each
forward's token ids from the input embedding's own input, so this holds during KV-cached generation too.
Every edited forward checks that its logits are finite: an edit too large for the model's numbers is one
clear error, never an empty or garbage continuation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from pipeline.cache.normalize import Normalizer
from pipeline.infra.errors import UserError
from pipeline.live.routing import route_choice
from pipeline.llm.hooks import replace_input, replacing
from pipeline.sae.archs.route import RouteSAE
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import Latents
from pipeline.steer.edits import Edit, Positions

MODES = ("delta", "replace")


@dataclass
class Target:
    """The edits of one SAE: at its layer (TopK) or at each token's routed layer (RouteSAE)."""

    sae: TopKSAE  # the SAE (a RouteSAE's shared TopK SAE)
    layer: int  # model layer (input of block `layer`); for a RouteSAE, the one being edited
    normalizer: Normalizer  # the cache's normalization
    edits: list[Edit]
    special: frozenset[int]  # token ids never edited (BOS, EOS, pad: attention sinks with huge norms)
    a_max: dict[int, float] = field(default_factory=dict)  # latent -> largest activation (direction edits)
    router: RouteSAE | None = None  # set for RouteSAE runs


@dataclass
class Tally:
    """How many token positions edits landed on (a position counts once per forward that edits it)."""

    positions: int = 0


def editable(tokens: Tensor, target: Target) -> Tensor:
    """(B, T) bool: the positions whose token is not one of the target's special tokens."""
    special = torch.tensor(sorted(target.special), dtype=tokens.dtype, device=tokens.device)
    return ~torch.isin(tokens, special)


def check_finite(logits: Tensor, target: Target) -> None:
    """One clear error when an edit pushed the model past its number range (inf / NaN logits)."""
    if not bool(torch.isfinite(logits).all()):
        edits = " ".join(f"{e.latent}={e.kind}:{e.value:g}" for e in target.edits)
        raise UserError(
            f"the edit {edits} overflows the model's numbers (its logits become inf / NaN), so the edited text "
            "would be garbage; use a smaller value (activations are of the order of the feature's a_max)."
        )


def code_change(target: Target, latents: Latents) -> Tensor:
    """W_dec^T (z' - z) for a batch of codes (M, k): the edits' change to the reconstruction (M, D)."""
    sae = target.sae
    change = torch.zeros(latents.acts.shape[0], sae.cfg.d_in, device=latents.acts.device)  # (M, D)
    for edit in target.edits:
        old = (latents.acts * (latents.indices == edit.latent)).sum(-1)  # (M,)
        new = edit.new_value(old, target.a_max.get(edit.latent, 1.0))  # (M,)
        change += (new - old)[:, None] * sae.directions([edit.latent])
    return change


@torch.no_grad()
def edit_hidden(h: Tensor, target: Target, mode: str, weight: Tensor | None = None) -> Tensor:
    """The edited version of the rows ``h`` (M, D) of the residual stream; ``weight`` (M,): RouteSAE
    routing weights (the SAE sees w * x, so its change reaches x divided by w)."""
    x, stats = target.normalizer.normalize(h, target.layer)  # (M, D)
    w = weight[:, None] if weight is not None else torch.ones((), device=h.device)  # (M, 1) or ()
    latents = target.sae.encode(x * w)
    change = code_change(target, latents)  # (M, D), in the SAE's input space
    if mode == "delta":
        return (h.float() + change / w * stats[1]).to(h.dtype)
    return target.normalizer.denormalize((target.sae.decode(latents) + change) / w, stats).to(h.dtype)


@contextmanager
def steering(
    model: nn.Module, blocks: nn.ModuleList, targets: list[Target], mode: str, positions: Positions, prompt_len: int
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

    def make_edit(target: Target):  # noqa: ANN202 - a hook function
        def edit(h: Tensor) -> Tensor:  # (B, T, D)
            start = seen[id(target)]
            seen[id(target)] = start + h.shape[1]
            where = positions.mask(start, h.shape[1], prompt_len, h.device)[None]  # (1, T)
            where = where & editable(tokens[0], target)  # (B, T): never a special token
            if not bool(where.any()):
                return h
            tally.positions += int(where.sum())
            out = h.clone()
            out[where] = edit_hidden(h[where], target, mode)  # (M, D) rows of the edited positions
            return out

        return edit

    def check(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if tally.positions:
            check_finite(output.logits, targets[0])

    with ExitStack() as stack:
        embedding = cast(nn.Module, model.get_input_embeddings())  # type: ignore[operator]
        stack.callback(embedding.register_forward_pre_hook(read_tokens).remove)
        stack.callback(model.register_forward_hook(check).remove)
        for target in targets:
            stack.enter_context(replace_input(blocks[target.layer], make_edit(target)))
        yield tally


@torch.no_grad()
def routed_logits(
    model: nn.Module,
    blocks: nn.ModuleList,
    target: Target,
    mode: str,
    positions: Positions,
    tokens: Tensor,
    prompt_len: int,
    tally: Tally | None = None,
) -> Tensor:
    """Logits (B, T, V) of ``tokens`` with a RouteSAE's edits applied at each token's routed layer
    (counted into ``tally`` when given)."""
    router = target.router
    assert router is not None, "routed_logits needs a RouteSAE target"
    choice, weight = route_choice(model, blocks, router, target.normalizer, tokens)  # (B, T), (B, T)
    where = positions.mask(0, tokens.shape[1], prompt_len, tokens.device)[None] & (choice >= 0)  # (B, T)
    where &= editable(tokens, target)  # (B, T): never a special token

    def make_edit(here: Tensor, at: Target):  # noqa: ANN202 - a hook function
        def edit(h: Tensor) -> Tensor:  # (B, T, D)
            if not bool(here.any()) or not at.edits:
                return h
            out = h.clone()
            out[here] = edit_hidden(h[here], at, mode, weight[here])
            return out

        return edit

    edits = {
        layer: make_edit(where & (choice == i), replace(target, layer=layer))
        for i, layer in enumerate(router.cfg.layers)
    }
    with replacing(blocks, edits):
        logits = model(input_ids=tokens).logits  # (B, T, V)
    if target.edits and bool(where.any()):
        check_finite(logits, target)
        if tally is not None:
            tally.positions += int(where.sum())
    return logits


@torch.no_grad()
def routed_generate(
    model: nn.Module,
    blocks: nn.ModuleList,
    target: Target,
    mode: str,
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
