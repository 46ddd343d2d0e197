"""Resumable training state of a run: a folder ``state-<step>/`` (weights, optimizer tensors,
dead-latent counters) named by the pointer file ``state.json``, written whole before the pointer
moves. Loads use safetensors and JSON only, never pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.infra.errors import CorruptError
from pipeline.infra.files import Folder


@dataclass
class TrainingState:
    """What resuming needs besides the weights."""

    step: int  # optimizer steps done
    optimizer: dict[str, Any]  # torch optimizer state_dict
    since_fired: torch.Tensor  # (N,) tokens since each latent last fired
    log_rows: int  # rows of log.csv written up to this step
    sae: dict[str, float]  # the architecture's own training state (SAE.training_state), e.g. a controller's


def save_state(folder: Folder, model: nn.Module, state: TrainingState) -> None:
    """Write ``state-<step>/`` whole, then point ``state.json`` at it, then drop older states."""
    name = f"state-{state.step:09d}"
    tmp = folder.local() / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tensors, meta = _flatten_optimizer(state.optimizer)
    tensors["since_fired"] = state.since_fired.cpu()
    tensors.update({f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    save_file(tensors, str(tmp / "state.safetensors"))
    info = {"step": state.step, "log_rows": state.log_rows, "optimizer": meta, "sae": state.sae}
    (tmp / "state.json").write_text(json.dumps(info))
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
    # a state written before architectures saved their own has no "sae": they take up from their start
    return TrainingState(meta["step"], optimizer, tensors["since_fired"], meta["log_rows"], meta.get("sae", {}))


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
    # JSON made lists of the groups' tuples (Adam's betas, Muon's Newton-Schulz coefficients)
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}
