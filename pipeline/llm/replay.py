"""Run a model from a middle block up, its lower blocks computed once.

When only the blocks from layer L up see a change (an edit at layer L or above), every forward on the
same prompts repeats blocks 0..L-1 for the same result. ``stem`` runs the model once and keeps what
block L and each block above it received: the residual stream entering block L and the other
arguments the model hands its blocks (attention mask, rotary embeddings, position ids), which do not
depend on the residual stream. ``resume`` then runs blocks L.. on that residual stream (through their
hooks, so edits installed with :func:`pipeline.llm.hooks.replacing` apply) and the final norm.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from pipeline.llm.unembed import final_norm


class Call(NamedTuple):
    """What the model passed a block besides its residual stream."""

    args: tuple[Any, ...]  # positional arguments after the residual stream
    kwargs: dict[str, Any]  # keyword arguments, ``hidden_states`` left out
    positional: bool  # the residual stream came first among the positional arguments


class Stem(NamedTuple):
    """One prompt set's forward below block ``layer``, kept to resume from."""

    layer: int
    hidden: Tensor  # (B, T, D): the residual stream entering block ``layer``
    calls: list[Call]  # one per block from ``layer`` up
    last: Tensor  # (B, T, D): the unedited forward's last hidden state, after the final norm


@torch.no_grad()
def stem(model: nn.Module, blocks: nn.ModuleList, input_ids: Tensor, layer: int) -> Stem | None:
    """Blocks ``layer``.. and what they receive on ``input_ids`` (one full forward); None when the model's
    final norm is not one we know (then only the full forward gives its output)."""
    if final_norm(model) is None:
        return None
    calls: list[Call] = []
    hidden: list[Tensor] = []

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        positional = bool(args)
        if not hidden:
            hidden.append(args[0] if positional else kwargs["hidden_states"])
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        calls.append(Call(args[1:] if positional else args, rest, positional))

    handles = [blocks[i].register_forward_pre_hook(record, with_kwargs=True) for i in range(layer, len(blocks))]
    try:
        last = cast(nn.Module, model.base_model)(input_ids=input_ids, use_cache=False).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return Stem(layer, hidden[0], calls, last)


def resume(model: nn.Module, blocks: nn.ModuleList, start: Stem) -> Tensor:
    """The last hidden state (B, T, D), after the final norm, from blocks ``start.layer``.. only."""
    h = start.hidden  # (B, T, D)
    for block, call in zip(blocks[start.layer :], start.calls):
        if call.positional:
            out = block(h, *call.args, **call.kwargs)
        else:
            out = block(*call.args, hidden_states=h, **call.kwargs)
        h = out[0] if isinstance(out, tuple) else out  # (B, T, D); older transformers return tuples
    return cast(nn.Module, final_norm(model))(h)
