"""Forward hooks on transformer blocks: capture the residual stream, or replace it.

Layer ``L`` is the input of block ``L``, read with a forward *pre*-hook, so the same hook point
serves capture (extract) and splicing (evaluate). Hooks are always removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from pipeline.llm.sites import find_mlp


class StopForward(Exception):
    """Raised inside the last needed block's pre-hook: the blocks above it never run."""


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def capture(
    blocks: nn.ModuleList, layers: list[int], sites: tuple[str, ...] = ("resid",)
) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    """Record ``{(site, layer): tensor}`` for every site and layer (pipeline.llm.sites) and end the forward
    as soon as the last of them is known: at block ``max(layers)``'s input, or after its MLP."""
    captured: dict[tuple[str, int], torch.Tensor] = {}
    last = max(layers)
    mlp = any(site != "resid" for site in sites)

    def pre_hook(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["resid", layer] = _hidden(args, kwargs)
            if layer == last and not mlp:
                raise StopForward

        return hook

    def mlp_hook(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            captured["mlp_in", layer], captured["mlp_out", layer] = args[0], output
            if layer == last:
                raise StopForward

        return hook

    handles = [blocks[layer].register_forward_pre_hook(pre_hook(layer), with_kwargs=True) for layer in layers]
    handles += [find_mlp(blocks[layer]).register_forward_hook(mlp_hook(layer)) for layer in layers if mlp]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_to_sites(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, layers: list[int], sites: tuple[str, ...]
) -> dict[tuple[str, int], torch.Tensor]:
    """``{(site, layer): (B, T, D)}`` from one forward that stops as soon as the last of them is known."""
    with capture(blocks, layers, sites) as captured:
        try:
            base = cast(nn.Module, model.base_model)  # no LM head: the base model only
            base(input_ids=input_ids, use_cache=False)
        except StopForward:
            pass
    return {(site, layer): captured[site, layer] for site in sites for layer in layers}


def run_to_layers(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, layers: list[int]
) -> dict[int, torch.Tensor]:
    """Residual streams ``{layer: (B, T, D)}`` from one forward that stops after the last layer."""
    return {layer: h for (_, layer), h in run_to_sites(model, blocks, input_ids, layers, ("resid",)).items()}


@contextmanager
def replace_input(block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Feed ``fn(h)`` to ``block`` instead of its input ``h`` while the context is open."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        new = fn(_hidden(args, kwargs))
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class MlpOut(NamedTuple):
    """A hook point besides the block inputs: the output of block ``layer``'s MLP (what it adds to the residual)."""

    layer: int


@contextmanager
def replace_mlp_output(mlp: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Let ``mlp`` return ``fn(its input, its output)`` while the context is open."""
    handle = mlp.register_forward_hook(lambda module, args, output: fn(args[0], output))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def replacing(blocks: nn.ModuleList, edits: Mapping[int | MlpOut, Callable[..., torch.Tensor]]) -> Iterator[None]:
    """While open: block L's input h becomes ``edits[L](h)``; with an :class:`MlpOut` key, block L's MLP output
    becomes ``edits[MlpOut(L)](mlp input, mlp output)``."""
    with ExitStack() as stack:
        for where, fn in edits.items():
            if isinstance(where, MlpOut):
                stack.enter_context(replace_mlp_output(find_mlp(blocks[where.layer]), fn))
            else:
                stack.enter_context(replace_input(blocks[where], fn))
        yield
