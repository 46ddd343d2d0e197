"""SAE run folders: ``cfg.json`` + ``sae.safetensors`` (+ ``log.csv``; the resumable training state
is :mod:`pipeline.fit.state`'s).

cfg.json holds everything needed to rebuild and use the SAE without the training code: the
architecture, the model and layer(s) it reads, the cache it was trained on and its normalization.
Loads use safetensors and JSON only, never pickle.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.cache.manifest import check_format
from pipeline.infra.errors import CorruptError, UserError
from pipeline.infra.files import Folder
from pipeline.sae.archs.route import RouteSAE
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import SaeConfig, build_sae

RUN_FORMAT = "sae-pipe/sae"
RUN_FORMAT_VERSION = 1


def write_cfg(folder: Folder, cfg: dict[str, Any]) -> None:
    """Write cfg.json (atomically) with its format header."""
    folder.write_json({"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, **cfg}, "cfg.json")


def read_cfg(folder: Folder) -> dict[str, Any]:
    """cfg.json of a run, checked for format; a missing or damaged file is a clear error."""
    if not folder.exists("cfg.json"):
        raise UserError(f"{folder.url} is not an SAE run folder (no cfg.json); `sae-pipe fit` prints run folders.")
    try:
        cfg = folder.read_json("cfg.json")
    except ValueError as err:
        raise CorruptError(f"{folder.url}/cfg.json is not valid JSON ({err}).") from None
    check_format(cfg, f"{folder.url}/cfg.json", RUN_FORMAT, RUN_FORMAT_VERSION)
    return cfg


def save_weights(folder: Folder, model: nn.Module, name: str = "sae.safetensors") -> None:
    """Weights as float32 safetensors, written under a temporary name then renamed."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    local = folder.local()
    tmp = local / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata={"format": RUN_FORMAT})
    folder.rename(tmp.name, name)


def load_sae(where: str | Folder, device: torch.device | str = "cpu") -> tuple[TopKSAE | RouteSAE, dict[str, Any]]:
    """Rebuild a trained SAE and return it with its cfg.json."""
    folder = where if isinstance(where, Folder) else Folder.at(where)
    cfg = read_cfg(folder)
    if cfg.get("status") != "complete":
        raise UserError(
            f"run {folder.url} has not finished training (status {cfg.get('status')!r}); "
            "re-run `sae-pipe fit` with --resume to finish it."
        )
    if not folder.exists("sae.safetensors"):
        raise UserError(f"run {folder.url} has no sae.safetensors; re-run `sae-pipe fit` for it.")
    model = cast(TopKSAE | RouteSAE, build_sae(SaeConfig(**cfg["sae"]), device=device))  # every arch is one
    try:
        model.load_state_dict(load_file(str(folder.local() / "sae.safetensors"), device=str(device)))
    except (RuntimeError, OSError, ValueError) as err:
        raise CorruptError(f"{folder.url}/sae.safetensors cannot be loaded: {str(err)[:200]}") from None
    return model.eval(), cfg
