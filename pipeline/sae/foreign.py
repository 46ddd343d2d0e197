"""A checkpoint of another library, read into sae-pipe's conventions (the shared half of import).

:mod:`pipeline.sae.saelens` and :mod:`pipeline.sae.sparsify` each turn their folder into a
:class:`Foreign`: tensors renamed and laid out as our SAE modules hold them (``W_enc (N, D)``,
``W_dec (N, D)``), conventions mapped (with a note for each), the hook translated to our layer index.
Here: loading safetensors safely and checking the tensors before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.cache.normalize import Normalizer
from pipeline.infra.errors import UserError
from pipeline.sae.route import build_sae
from pipeline.sae.topk import SaeConfig, TopKSAE

PICKLES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


@dataclass
class Foreign:
    """One imported SAE in our conventions, not yet checked against a model."""

    fmt: str  # saelens | sparsify
    folder: Path  # the checkpoint folder it was read from
    sae: SaeConfig  # arch, sizes, k and [layer]
    tensors: dict[str, torch.Tensor]  # our state-dict names and layouts, float32
    normalization: Normalizer  # what the SAE expects applied to the residual stream
    hook: str  # the checkpoint's own name for the place it reads
    model: str | None  # the model the checkpoint names (None: it names none)
    context_size: int | None = None  # tokens per training sequence, when stated
    notes: list[str] = field(default_factory=list)  # every convention mapped, in words

    @property
    def layer(self) -> int:
        return self.sae.layers[0]

    def module(self) -> TopKSAE:
        """The SAE module with these weights (eval mode, CPU)."""
        model = build_sae(self.sae)
        assert isinstance(model, TopKSAE)
        model.load_state_dict(self.tensors)
        return model.eval()


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON config; unreadable JSON is a clear error."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable JSON config ({err}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; it is not an SAE config.")
    return data


def load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/name`` (safetensors only: a pickle can run code when loaded)."""
    path = folder / name
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLES)
        if pickles:
            raise UserError(
                f"{folder} holds {', '.join(pickles)} (a pickle) instead of {name}; sae-pipe reads safetensors "
                "only, because loading a pickle can run code. Convert it with safetensors.torch.save_file."
            )
        raise UserError(f"{folder} has no {name}; give the folder that holds the SAE's weights.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"{path} is not a safetensors file ({str(err)[:120]}); sae-pipe reads safetensors only "
            "(a renamed pickle is refused: loading one can run code)."
        ) from None


def check_tensors(where: Path, found: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Exactly the expected tensor names (checkpoint names), each of its shape and finite."""
    missing = sorted(set(shapes) - set(found))
    if missing:
        raise UserError(
            f"checkpoint {where} lacks tensor(s) {', '.join(missing)}; it is incomplete or not this kind of SAE."
        )
    extra = sorted(set(found) - set(shapes))
    if extra:
        raise UserError(
            f"checkpoint {where} has tensor(s) {', '.join(extra)} that sae-pipe does not know how to apply; "
            "importing without them would change the SAE."
        )
    for name, shape in shapes.items():
        if tuple(found[name].shape) != shape:
            raise UserError(
                f"tensor {name} of {where} has shape {tuple(found[name].shape)}, but its config implies {shape}."
            )
        if not bool(torch.isfinite(found[name].float()).all()):
            raise UserError(f"tensor {name} of {where} holds NaN or infinite values; the checkpoint is damaged.")


def check_arch(arch: str, where: Path, known: dict[str, str]) -> str:
    """Our architecture for a checkpoint's name of it, or one clear refusal."""
    if arch not in known:
        raise UserError(f"checkpoint {where} has architecture {arch!r}; sae-pipe imports {', '.join(sorted(known))}.")
    return known[arch]
