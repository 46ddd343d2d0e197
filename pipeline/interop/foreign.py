"""A checkpoint of another library, read into sae-pipe's conventions (the shared half of import).

:mod:`pipeline.interop.saelens` and :mod:`pipeline.interop.sparsify` each turn their folder into a
:class:`Foreign`: tensors renamed and laid out as our SAE modules hold them (``W_enc (N, D)``,
``W_dec (N, D)``), conventions mapped (with a note for each), the hook translated to our layer index.
Here: loading safetensors safely, checking the tensors, the config's numbers and its field names
before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.cache.normalize import Normalizer
from pipeline.infra.errors import UserError
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import REGISTRY, SaeConfig, build_sae

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
    centred: bool | None = False  # SAELens: read from a TransformerLens model with centred writing weights
    # (None: a pre-6 config that does not say); resolved against the model by pipeline.interop.importing
    dtype: str | None = None  # the dtype the checkpoint states it computes in (ours: float32)

    @property
    def layer(self) -> int:
        return self.sae.layers[0]

    @property
    def transcodes(self) -> bool:
        """Whether it is a transcoder: it reads block ``layer``'s MLP input and predicts that MLP's output."""
        return REGISTRY[self.sae.arch].sites == ("mlp_in", "mlp_out")

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


def whole(cfg: dict[str, Any], name: str, where: Path, default: int | None = None, least: int = 1) -> int:
    """A size or count of a config: a whole number (``32.0`` is 32) of at least ``least``; never rounded."""
    value = cfg.get(name, default)
    if value is None:
        raise UserError(f"{where} lacks {name}; it is not a complete SAE config.")
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise UserError(
            f"{name} in {where} is {value!r}, not a whole number; sae-pipe never rounds a size or a k "
            "(a fractional or non-numeric value means the config is damaged)."
        )
    if value < least:
        raise UserError(f"{name} in {where} is {value!r}; it must be at least {least}.")
    return int(value)


def check_fields(names: Iterable[str], known: Iterable[str], where: Path, library: str) -> None:
    """Refuse config fields that no table of the importer accounts for: one could change what the SAE computes."""
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise UserError(
            f"{where} has config field(s) {', '.join(unknown)} that sae-pipe does not know for {library}; "
            "importing without applying them could change what the SAE computes. If you know they do not, "
            "remove them from a copy of the config and import that."
        )


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
