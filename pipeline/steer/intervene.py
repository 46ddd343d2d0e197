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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from pipeline.cache.normalize import Normalizer
from pipeline.llm.hooks import replace_input, replacing
from pipeline.sae.route import RouteSAE
from pipeline.sae.routing import route_choice
from pipeline.sae.topk import Latents, TopKSAE
from pipeline.steer.edits import Edit, Positions

MODES = ("delta", "replace")


@dataclass
class Target:
    """The edits of one SAE: at its layer (TopK) or at each token's routed layer (RouteSAE)."""

    sae: TopKSAE  # the SAE (a RouteSAE's shared TopK SAE)
    layer: int  # model layer (input of block `layer`); for a RouteSAE, the one being edited
    normalizer: Normalizer  # the cache's normalization
    edits: list[Edit]
    a_max: dict[int, float] = field(default_factory=dict)  # latent -> largest activation (direction edits)
    router: RouteSAE | None = None  # set for RouteSAE runs


def code_change(target: Target, latents: Latents) -> Tensor:
    """W_dec^T (z' - z) for a batch of codes (M, k): the edits' change to the reconstruction (M, D)."""
    sae = target.sae
    change = torch.zeros(latents.acts.shape[0], sae.cfg.d_in, device=latents.acts.device)  # (M, D)
    for edit in target.edits:
        old = (latents.acts * (latents.indices == edit.latent)).sum(-1)  # (M,)
        new = edit.new_value(old, target.a_max.get(edit.latent, 1.0))  # (M,)
        change += (new - old)[:, None] * sae.W_dec[edit.latent]
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
    blocks: nn.ModuleList, targets: list[Target], mode: str, positions: Positions, prompt_len: int
) -> Iterator[None]:
    """Apply every target's edits during one `generate` (or one forward) of a single sequence.

    Positions are absolute: the first call sees the prompt, each later call (KV cache) one new token.
    """
    seen = {id(t): 0 for t in targets}

    def make_edit(target: Target):  # noqa: ANN202 - a hook function
        def edit(h: Tensor) -> Tensor:  # (1, T, D)
            start = seen[id(target)]
            seen[id(target)] = start + h.shape[1]
            where = positions.mask(start, h.shape[1], prompt_len, h.device)  # (T,)
            if not bool(where.any()):
                return h
            out = h.clone()
            out[:, where] = edit_hidden(h[:, where].flatten(0, 1), target, mode).view(h.shape[0], -1, h.shape[-1])
            return out

        return edit

    with ExitStack() as stack:
        for target in targets:
            stack.enter_context(replace_input(blocks[target.layer], make_edit(target)))
        yield


@torch.no_grad()
def routed_logits(
    model: nn.Module,
    blocks: nn.ModuleList,
    target: Target,
    mode: str,
    positions: Positions,
    tokens: Tensor,
    prompt_len: int,
) -> Tensor:
    """Logits (B, T, V) of ``tokens`` with a RouteSAE's edits applied at each token's routed layer."""
    router = target.router
    assert router is not None, "routed_logits needs a RouteSAE target"
    choice, weight = route_choice(model, blocks, router, target.normalizer, tokens)  # (B, T), (B, T)
    where = positions.mask(0, tokens.shape[1], prompt_len, tokens.device)[None] & (choice >= 0)  # (B, T)

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
        return model(input_ids=tokens).logits


@torch.no_grad()
def routed_generate(
    model: nn.Module,
    blocks: nn.ModuleList,
    target: Target,
    mode: str,
    positions: Positions,
    ids: Tensor,
    options: tuple[int, bool, float, int],
) -> Tensor:
    """Generation (1, T + new) with routed edits; options = (max_new_tokens, sample, temperature, seed)."""
    max_new_tokens, sample, temperature, seed = options
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    eos = getattr(model.generation_config, "eos_token_id", None)
    seq = ids
    for _ in range(max_new_tokens):
        logits = routed_logits(model, blocks, target, mode, positions, seq, ids.shape[1])[:, -1].float()  # (1, V)
        if sample:
            token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)  # (1, 1)
        else:
            token = logits.argmax(-1, keepdim=True)  # (1, 1)
        seq = torch.cat([seq, token], dim=1)
        if eos is not None and int(token) in ([eos] if isinstance(eos, int) else eos):
            break
    return seq
