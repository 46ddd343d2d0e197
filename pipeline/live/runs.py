"""Which runs a stage takes: the one place that decides it, for the runs of a fit receipt (the DVC stages)
and for the runs of a folder (``--all DIR``).

A stage that splices an SAE at one layer cannot take every architecture: steer edits one layer (a soft-routed
RouteSAE's code mixes layers), circuit's nodes are latents at fixed layers (one run per layer, no RouteSAE),
finetune trains single-layer SAEs and transcoders (no RouteSAE). The stage itself refuses such a run with a full
error; a list of runs (a receipt, a folder) skips it with one line saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.infra.console import say
from pipeline.infra.files import Folder
from pipeline.sae.folder import read_cfg
from pipeline.sae.interface import REGISTRY


def soft_routed(sae: dict[str, Any]) -> bool:
    """A routed SAE whose code mixes layers: no single layer of the model can take it back."""
    return routed(sae) and sae.get("routing") == "soft"


def routed(sae: dict[str, Any]) -> bool:
    """An SAE that routes each token to one of several layers (RouteSAE): its latents sit at no one layer (a
    transcoder's pair of MLP sites is one layer's)."""
    arch = REGISTRY[sae["arch"]]
    return arch.multi_layer and arch.sites == ("resid",)


@dataclass(frozen=True)
class Takes:
    """A stage's rule on runs: which SAEs it refuses (cfg.json's sae block) and the line a skipped run gets."""

    refuses: Callable[[dict[str, Any]], bool] | None = None
    note: str = ""  # formatted with path (the run folder) and arch
    one_per_layer: bool = False  # keep the first run of each layer, skip the others


TAKES = {
    "evaluate": Takes(),
    "interpret": Takes(),
    "steer": Takes(soft_routed, "steer: skipping soft-routed run {path} (its code has no single layer to edit)"),
    "circuit": Takes(routed, "circuit: skipping {arch} run {path} (circuits are found over single-layer runs)", True),
    "finetune": Takes(
        routed, "finetune: skipping {arch} run {path} (finetune takes single-layer SAEs and transcoders)"
    ),
}


def takes(stage: str, sae: dict[str, Any]) -> bool:
    """Whether ``stage`` can take a run of this SAE (cfg.json's sae block)."""
    refuses = TAKES[stage].refuses
    return refuses is None or not refuses(sae)


def taken(stage: str, paths: list[str]) -> list[str]:
    """The runs of ``paths`` that ``stage`` takes, in order; each skipped run gets one line saying why."""
    rule, kept = TAKES[stage], []
    first: dict[int, str] = {}  # layer -> the run kept for it (one_per_layer)
    for path in paths:
        sae = read_cfg(Folder.at(path))["sae"] if rule.refuses or rule.one_per_layer else {}
        if not takes(stage, sae):
            say(rule.note.format(path=path, arch=sae["arch"]))
            continue
        if rule.one_per_layer:
            layer = sae["layers"][0]
            if layer in first:
                say(f"{stage}: skipping {path}: layer {layer} already has {first[layer]}")
                continue
            first[layer] = path
        kept.append(path)
    return kept


def finished_runs(root: str) -> list[str]:
    """Finished run folders directly under ``root`` (a folder of runs, e.g. cache/saes): what ``--all`` adds."""
    folder = Folder.at(root)
    runs = []
    for name in folder.list():
        child = folder.child(name)
        if child.exists("cfg.json") and child.exists("sae.safetensors"):
            if child.read_json("cfg.json").get("status") == "complete":
                runs.append(child.url)
    return runs
