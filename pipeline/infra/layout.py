"""The folders under ``cache_root``: the one place their names are spelled.

Every stage asks :class:`Layout` where its outputs go and where another stage's outputs are (steer and circuit
read interpret's tables from here), so moving a folder is a change to this module alone::

    <root>/activations/<key>/          extract: one activation cache per key
    <root>/saes/<run>/                 fit (and import): run folders
    <root>/finetune/<run>-ft<loss>-<hash>/   finetune: new run folders
    <root>/evaluate/<run>/             evaluate: metrics.json (+ SAEBench files), comparison.* beside them
    <root>/interpret/<run>/            interpret: feature tables, explanations, scores, report.html
    <root>/interpret/.answers/         interpret: the explainer's and scorers' answer cache
    <root>/steer/<run>/                steer --evaluate: the dose-response grid
    <root>/steer/.answers/             steer: the judge's answer cache
    <root>/circuits/<task>-<hash>/     circuit: one folder per task and settings
    <root>/plots/<stage>/              DVC plots (fit's training curves)
    <root>/<stage>.json                DVC receipts handed between stages
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pipeline.infra.files import Folder


class Interpreted(NamedTuple):
    """interpret's outputs for one run, as the stages after it read them (each may be missing)."""

    features: Path  # features.parquet: one row per latent (max_act, output_score, ...)
    examples: Path  # examples.parquet: the top examples per latent
    explanations: Path  # explanations.parquet: the explainer's text per latent
    report: Path  # report.html, with one anchor per latent


@dataclass(frozen=True)
class Layout:
    """Where each stage's outputs live below ``root`` (a local path or an fsspec URL)."""

    root: str = "cache"

    @property
    def folder(self) -> Folder:
        return Folder.at(self.root)

    def activations(self, key: str | None = None) -> Folder:
        return self._under("activations", key)

    def saes(self, run: str | None = None) -> Folder:
        return self._under("saes", run)

    def finetune(self, name: str | None = None) -> Folder:
        return self._under("finetune", name)

    def evaluate(self) -> Folder:
        return self._under("evaluate", None)

    def interpret(self, run: str | None = None) -> Folder:
        return self._under("interpret", run)

    def steer(self, run: str | None = None) -> Folder:
        return self._under("steer", run)

    def circuits(self, name: str | None = None) -> Folder:
        return self._under("circuits", name)

    def answers(self, stage: str) -> Folder:
        """The answer cache of a stage that asks an LLM API (interpret, steer): a re-run pays for nothing twice."""
        return self._under(stage, ".answers")

    def plots(self, stage: str) -> Folder:
        return self._under("plots", stage)

    def receipt(self, stage: str) -> str:
        """The receipt's file name in :attr:`folder` (``<stage>.json``)."""
        return f"{stage}.json"

    def interpreted(self, run: str) -> Interpreted:
        """interpret's output files for run folder name ``run`` (on the local disk)."""
        folder = self.interpret(run).local()
        names = ("features.parquet", "examples.parquet", "explanations.parquet", "report.html")
        return Interpreted(*(folder / name for name in names))

    def relative(self, folder: Folder) -> str:
        """``folder``'s path below the root (e.g. ``circuits/<name>``), for metrics that compare results rather
        than the checkouts they ran in."""
        return os.path.relpath(folder.url, self.folder.url)

    def _under(self, top: str, name: str | None) -> Folder:
        return self.folder.child(top) if name is None else self.folder.child(top, name)
