"""`sae-pipe evaluate --suite`: SAEBench-style metric families, each in its own module, written per SAE in
SAEBench's output format (:mod:`pipeline.interop.saebench`).

A suite may ride along the held-out pass that computes nmse (a *tap* sees every batch of the SAE's output,
so the cache is read once for all suites) and gets the spliced forwards' KL / CE after it.

  core        SAEBench's core metrics (pipeline/evaluate/core.py)
  absorption  first-letter feature absorption (absorption.py; the only suite with its own LLM forwards: one
              short prompt per word, shared by every SAE at the layer)
  probing     k-sparse probes on documents pooled from the cache (probing.py)
  geometry    decoder cosine neighbours, encoder-decoder alignment, near duplicates (geometry.py)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from pipeline.evaluate.absorption import absorption_suite
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.core import CoreTap, core_result, eval_config, heldout_keys
from pipeline.evaluate.geometry import Geometry, geometry_result, latent_geometry
from pipeline.evaluate.probing import check_label, probing_suite
from pipeline.infra.console import say
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.infra.layout import Layout
from pipeline.interop.saebench import EvalResult, write_result
from pipeline.live.subject import Subject


class Suite(NamedTuple):
    tap: Callable[[Subject, EvaluateConfig], CoreTap | None]  # what it sums over the held-out pass, if anything
    result: Callable[[Subject, EvaluateConfig, CoreTap | None, Geometry], EvalResult | None]


def _core_tap(s: Subject, cfg: EvaluateConfig) -> CoreTap | None:
    if not s.has_activations:  # an imported run without its layer's activations: nothing to reconstruct
        return None
    return CoreTap(s.cfg["sae"]["n_latents"], torch.from_numpy(heldout_keys(s.cache, cfg.max_tokens)))


def _core(s: Subject, cfg: EvaluateConfig, tap: CoreTap | None, g: Geometry) -> EvalResult | None:
    if tap is None or tap.rows == 0:
        say(f"core suite skipped for {s.folder.name}: its cache has no activation rows for its layer")
        return None
    return core_result(tap, g, s.result, eval_config(s.cache.manifest, s.result, cfg.batch_size, tap))


SUITES: dict[str, Suite] = {
    "core": Suite(_core_tap, _core),
    "absorption": Suite(lambda s, cfg: None, lambda s, cfg, tap, g: absorption_suite(s, cfg)),
    "probing": Suite(lambda s, cfg: None, lambda s, cfg, tap, g: probing_suite(s, cfg)),
    "geometry": Suite(lambda s, cfg: None, lambda s, cfg, tap, g: geometry_result(g)),
}


def check_suites(names: list[str]) -> None:
    """Refuse an unknown suite before any work."""
    unknown = sorted(set(names) - set(SUITES))
    if unknown:
        raise UserError(f"unknown --suite {', '.join(unknown)}; choose from {', '.join(SUITES)}.")


def suite_taps(s: Subject, cfg: EvaluateConfig) -> dict[str, CoreTap]:
    """The taps of the asked suites for run ``s``, by suite name (fed by ``fast_metrics``); called for every run
    before the first is evaluated, so a setting a suite cannot use fails before any work."""
    if "probing" in cfg.suite:
        check_label(s, cfg)
    taps = {name: SUITES[name].tap(s, cfg) for name in cfg.suite}
    return {name: tap for name, tap in taps.items() if tap is not None}


def write_suites(s: Subject, cfg: EvaluateConfig, taps: dict[str, CoreTap]) -> list[str]:
    """Finish every asked suite of run ``s`` and write each as a SAEBench file in its evaluate folder."""
    if not cfg.suite:
        return []
    g = latent_geometry(s.sae)  # shared: core reports the per-latent cosines too
    root = Folder.at(cfg.out) if cfg.out else Layout(cfg.cache_root).evaluate()
    written = []
    for name in cfg.suite:
        result = SUITES[name].result(s, cfg, taps.get(name), g)
        if result is not None:
            written.append(write_result(result, s.folder.name, s.cfg, root.child(s.folder.name)))
    return written
