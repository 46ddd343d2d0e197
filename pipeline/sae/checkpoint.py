"""SAE run folders: ``cfg.json`` + ``sae.safetensors`` (+ ``log.csv``, + resumable state while training).

cfg.json holds everything needed to rebuild and use the SAE without the training code: the
architecture, the model and layer(s) it reads, the cache it was trained on and its normalization.
Training state is a folder ``state-<step>/`` (weights, optimizer tensors, dead-latent counters) named
by the pointer file ``state.json``; loads use safetensors and JSON only, never pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.cache.manifest import check_format
from pipeline.infra.errors import CorruptError, UserError
from pipeline.infra.files import Folder
from pipeline.sae.route import RouteSAE, build_sae
from pipeline.sae.topk import SaeConfig, TopKSAE

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
    model = build_sae(SaeConfig(**cfg["sae"]), device=device)
    try:
        model.load_state_dict(load_file(str(folder.local() / "sae.safetensors"), device=str(device)))
    except (RuntimeError, OSError, ValueError) as err:
        raise CorruptError(f"{folder.url}/sae.safetensors cannot be loaded: {str(err)[:200]}") from None
    return model.eval(), cfg


@dataclass
class TrainingState:
    """What resuming needs besides the weights."""

    step: int  # optimizer steps done
    optimizer: dict[str, Any]  # torch optimizer state_dict
    since_fired: torch.Tensor  # (N,) tokens since each latent last fired
    log_rows: int  # rows of log.csv written up to this step


def save_state(folder: Folder, model: nn.Module, state: TrainingState) -> None:
    """Write ``state-<step>/`` whole, then point ``state.json`` at it, then drop older states."""
    name = f"state-{state.step:09d}"
    tmp = folder.local() / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tensors, meta = _flatten_optimizer(state.optimizer)
    tensors["since_fired"] = state.since_fired.cpu()
    tensors.update({f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": state.step, "log_rows": state.log_rows, "optimizer": meta}))
    folder.remove(name)
    folder.rename(tmp.name, name)
    folder.write_json({"state": name, "step": state.step}, "state.json")
    drop_state(folder, keep=name)


def drop_state(folder: Folder, keep: str | None = None) -> None:
    """Remove resumable states other than ``keep`` (all, with the pointer, when None) and any half-written
    temporary files a kill left behind."""
    for name in folder.list():
        stale = name.startswith(("state-", ".state-")) or name.endswith(".tmp")
        if stale and name != keep:
            folder.remove(name)
    if keep is None:
        folder.remove("state.json")


def load_state(folder: Folder, model: nn.Module, device: torch.device) -> TrainingState | None:
    """Restore weights and return the training state, or None when the run has none."""
    if not folder.exists("state.json"):
        return None
    try:
        name = folder.read_json("state.json")["state"]
        tensors = load_file(str(folder.local() / name / "state.safetensors"), device=str(device))
        meta = json.loads((folder.local() / name / "state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptError(
            f"training state in {folder.url} cannot be read ({err!r}); delete the run folder to train from scratch."
        ) from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer = _unflatten_optimizer(tensors, meta["optimizer"])
    return TrainingState(meta["step"], optimizer, tensors["since_fired"], meta["log_rows"])


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, slots in state_dict["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{slot}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[slot] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, slot = key.split(".", 2)
            state.setdefault(int(pid), {})[slot] = value
    for pid, slots in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(slots)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
