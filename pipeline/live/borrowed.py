"""The caches an imported run reads through: it was trained elsewhere, so it has no cache of its own.

* :class:`ModelOnly` (no cache given): names the model, so steering and the model's fingerprint check
  work; every read of tokens or activations is refused with one message saying what to pass.
* :class:`Borrowed` (a cache of the same model given with ``--cache``): its held-out token sequences
  always serve (KL / CE splice the SAE into the live model with the run's own normalization). Its
  activation rows serve the run only when they hold the run's layer either in exactly the run's
  normalization or raw (``--normalize none``, normalized here as the run expects); otherwise reading
  them is refused, since they would be on another scale than the SAE was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn

import numpy as np
import torch

from pipeline.cache.normalize import Normalizer
from pipeline.cache.reader import ActivationCache, Problem
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder


def _needs(run: str, cfg: dict[str, Any]) -> str:
    layer, norm = cfg["sae"]["layers"][0], cfg["cache"]["normalization"]["method"]
    return (
        f"any cache of model {cfg['cache']['model']['name']!r} serves kl/ce (its held-out tokens); nmse and "
        f"feature tables need one holding layer {layer} raw (extract --layers {layer} --normalize none)"
        + ("" if norm == "none" else f" or normalized exactly as run {Folder.at(run).name} expects ({norm})")
    )


class ModelOnly(ActivationCache):
    """What an imported run reads without a cache: its model, nothing else."""

    def __init__(self, run: str, cfg: dict[str, Any]) -> None:
        self.folder = Folder.at(run)
        self.manifest = {
            "key": None,
            "spec": {"model": cfg["cache"]["model"], "layers": [], "ctx_len": cfg["cache"]["ctx_len"]},
            "normalization": cfg["cache"]["normalization"],
            "rows": {"train": 0, "heldout": 0},
            "shards": [],
        }
        self.message = (
            f"run {self.folder.name} was imported and has no activation cache of its own; pass --cache CACHE: "
            + _needs(run, cfg)
            + "."
        )

    def _refuse(self) -> NoReturn:
        raise UserError(self.message)

    def rows(self, split: str) -> int:
        self._refuse()

    def read(self, shard: int, name: str, first: Any = slice(None)) -> np.ndarray:
        self._refuse()

    def read_into(self, shard: int, name: str, first: Any, out: np.ndarray) -> None:
        self._refuse()

    def split_rows(
        self, split: str, layers: list[int], max_rows: int = 0, site: str = "resid"
    ) -> Iterator[tuple[int, np.ndarray]]:
        self._refuse()

    def heldout_sequences(self, max_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
        self._refuse()

    def verify(self, only: list[str] | None = None) -> list[Problem]:
        return []


class Borrowed(ActivationCache):
    """Another run's cache of the same model, read as an imported run needs it."""

    def __init__(self, cache: ActivationCache, run: str, cfg: dict[str, Any]) -> None:
        super().__init__(cache.folder, cache.manifest)
        self.normalizer = Normalizer.from_dict(cfg["cache"]["normalization"])
        layer = cfg["sae"]["layers"][0]
        held = cache.manifest["normalization"]
        identity = self.normalizer.method == "none" and not self.normalizer.center  # rows as the SAE reads them
        self.raw = held["method"] == "none" and not identity
        usable = layer in cache.layers and (self.raw or Normalizer.from_dict(held) == self.normalizer)
        self.refusal = (
            None
            if usable
            else (
                f"cache {cache.key} holds layers {cache.layers} normalized {held['method']}, which imported run "
                f"{Folder.at(run).name} cannot read: " + _needs(run, cfg) + "."
            )
        )

    @property
    def usable(self) -> bool:
        return self.refusal is None

    def split_rows(
        self, split: str, layers: list[int], max_rows: int = 0, site: str = "resid"
    ) -> Iterator[tuple[int, np.ndarray]]:
        if self.refusal is not None:
            raise UserError(self.refusal)
        for shard, rows in super().split_rows(split, layers, max_rows, site):
            if self.raw:
                x = torch.from_numpy(rows.astype(np.float32))  # (n, L, D) as the model computed them
                normalized = [self.normalizer.normalize(x[:, i], layer)[0] for i, layer in enumerate(layers)]
                rows = torch.stack(normalized, 1).numpy()
            yield shard, rows
