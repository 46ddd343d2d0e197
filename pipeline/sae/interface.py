"""The one interface every SAE architecture implements, and the registry from cfg.json's ``arch`` to it.

Stages never touch an SAE's parameters: they encode, decode, ask for a dense code (circuit masks), for
latents' write directions (steering, logit effects) or for the decoder's linear part applied to a change
of code (delta splices). A new architecture is one module in this package that subclasses :class:`SAE`,
decorates itself with :func:`register`, and is imported by ``pipeline/sae/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pipeline.sae.topk import Latents, SaeConfig


class SAE(nn.Module, ABC):
    """An SAE as every stage sees it; ``cfg`` is the ``sae`` block of its cfg.json."""

    cfg: SaeConfig

    @abstractmethod
    def encode(
        self, x: Tensor, k: int | None = None, theta: float | None = None, low_precision: bool = False
    ) -> Latents:
        """Sparse code of ``x`` (B, D); ``k`` / ``theta`` override the inference rule."""

    @abstractmethod
    def decode(self, latents: Latents) -> Tensor:
        """Reconstruction (B, D) from a sparse code."""

    @abstractmethod
    def dense_code(self, x: Tensor) -> Tensor:
        """The inference code of ``x`` (M, D) as a dense (M, N) tensor, differentiable in ``x``."""

    @abstractmethod
    def directions(self, latents: Sequence[int] | Tensor | None = None) -> Tensor:
        """Write directions (F, D) of ``latents`` (all N when None): what one unit of each adds to x_hat."""

    def write(self, code: Tensor) -> Tensor:
        """The decoder's linear part on a dense code (M, N) -> (M, D), no bias: the reconstruction's change
        when the code changes by ``code``."""
        return code @ self.directions()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def normalize_decoder(self) -> None:
        """Keep decoder rows at unit norm (architectures without that constraint leave this as it is)."""


REGISTRY: dict[str, type[SAE]] = {}  # arch -> class, filled by @register as each module is imported
TRAINED: set[str] = set()  # the archs `fit` trains
S = TypeVar("S", bound=type[SAE])


def register(arch: str, trainable: bool = False) -> Callable[[S], S]:
    """Class decorator: ``arch`` in cfg.json builds this class; ``trainable`` lets `fit` train it."""

    def add(cls: S) -> S:
        REGISTRY[arch] = cls
        if trainable:
            TRAINED.add(arch)
        return cls

    return add


def trainable_archs() -> list[str]:
    return [a for a in REGISTRY if a in TRAINED]


def inference_only_archs() -> list[str]:
    return [a for a in REGISTRY if a not in TRAINED]


def build_sae(cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> SAE:
    """The module of ``cfg.arch``, freshly initialized (seeded by ``generator``)."""
    return REGISTRY[cfg.arch](cfg, generator, device)  # type: ignore[call-arg]
