"""`sae-pipe import`: a SAELens or sparsify checkpoint (local folder or hub repo) as a normal run folder.

The run folder holds our cfg.json + sae.safetensors, so every command that takes a run takes it,
plus the checkpoint's own config, kept as ``source_cfg.json``. Its cfg.json has no cache of its own
(``cache.key`` and ``cache.path`` are null): it names the model (checked by fingerprint like a
cache's), the layer, and the normalization the SAE expects. The folder is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline.cache.manifest import LAYER_CONVENTION
from pipeline.infra.console import say
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder, Memo
from pipeline.llm.model import BUILTIN_MODELS, fingerprint_model, model_shape, resolve_model
from pipeline.sae.folder import save_weights, write_cfg
from pipeline.sae.foreign import Foreign
from pipeline.sae.saelens import is_saelens, read_saelens
from pipeline.sae.sparsify import is_sparsify, read_sparsify

FORMATS = ("auto", "saelens", "sparsify")


def import_checkpoint(
    source: str,
    fmt: str = "auto",
    hookpoint: str | None = None,
    model: str | None = None,
    out: str | None = None,
    force: bool = False,
    cache_root: str = "cache",
) -> Folder:
    """Import one SAE from ``source``; return the new run folder."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}.")
    foreign = read_checkpoint(locate(source, hookpoint), fmt, hookpoint)
    root = Folder.at(cache_root)
    memo = Memo(root.local() / ".memo.json") if root.is_local else None
    spec, shape = _model_spec(foreign, model, force, memo)
    if foreign.sae.d_in != shape.d_model:
        raise UserError(
            f"the SAE reads {foreign.sae.d_in}-wide activations, but {spec['name']!r} has hidden size "
            f"{shape.d_model}; it belongs to another model."
        )
    if foreign.layer >= shape.n_layers:
        raise UserError(
            f"the SAE reads {foreign.hook} = layer {foreign.layer}, the output of the last block of the "
            f"{shape.n_layers}-block model; sae-pipe splices layers 0..{shape.n_layers - 1} (inputs of blocks)."
        )
    target = Folder.at(out) if out else root.child("saes", run_name(foreign, spec["name"]))
    if not out and target.exists("cfg.json"):  # the name hashes the weights: this very SAE, imported before
        say(f"already imported: {target.url}")
        return target
    if target.exists() and target.list():
        raise UserError(f"{target.url} exists and is not empty; choose a new --out folder (nothing was overwritten).")
    return _write(target, foreign, _record(foreign, spec, force))


def locate(source: str, hookpoint: str | None) -> Path:
    """A local folder as it is; otherwise a hub repo id, downloaded (only ``hookpoint``'s files, if given)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(f"{source} is neither a checkpoint folder nor a hub repo id like org/name.")
    from huggingface_hub import snapshot_download

    patterns = [f"{hookpoint}/*", "*.json"] if hookpoint else None
    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - network, auth or unknown id: one message for all
        raise UserError(
            f"cannot download {source!r} from the hub ({type(err).__name__}); check the id and the network "
            "(HF_HUB_OFFLINE), or give a local folder."
        ) from None


def read_checkpoint(folder: Path, fmt: str = "auto", hookpoint: str | None = None) -> Foreign:
    """The SAE in ``folder`` (or its subfolder ``hookpoint``) in our conventions."""
    sae_dir = _pick(folder, hookpoint)
    found = "saelens" if is_saelens(sae_dir) else "sparsify" if is_sparsify(sae_dir) else None
    if found is None:
        raise UserError(
            f"{sae_dir} holds no SAELens (cfg.json + sae_weights.safetensors) or sparsify (cfg.json + "
            "sae.safetensors) checkpoint."
        )
    if fmt not in ("auto", found):
        raise UserError(f"{sae_dir} is a {found} checkpoint, not {fmt}; pass --format {found} (or auto).")
    return (
        read_saelens(sae_dir) if found == "saelens" else read_sparsify(sae_dir, _own_name(sae_dir, folder, hookpoint))
    )


def _pick(folder: Path, hookpoint: str | None) -> Path:
    """The folder of the one SAE to import."""
    if hookpoint and (folder / hookpoint).is_dir():
        return folder / hookpoint
    if (folder / "cfg.json").is_file():
        return folder
    choices = sorted(str(p.parent.relative_to(folder)) for p in folder.glob("**/cfg.json"))
    if len(choices) == 1:
        return folder / choices[0]
    if not choices:
        raise UserError(f"{folder} holds no SAE checkpoint (no cfg.json in it or below it).")
    raise UserError(
        f"{folder} holds {len(choices)} SAEs ({', '.join(choices[:8])}{', ...' if len(choices) > 8 else ''}); "
        "choose one with --hookpoint."
    )


def _own_name(sae_dir: Path, folder: Path, hookpoint: str | None) -> str | None:
    """A --hookpoint that names the checkpoint itself (not one of its subfolders) overrides its folder name."""
    return hookpoint if hookpoint and sae_dir == folder else None


def _model_spec(foreign: Foreign, model: str | None, force: bool, memo: Memo | None) -> tuple[dict[str, Any], Any]:
    """The model block of cfg.json (name, kind, fingerprint) and the model's shape, checked against the checkpoint."""
    name = model or foreign.model
    if not name:
        raise UserError(f"checkpoint {foreign.folder} names no model; pass --model (the model the SAE was trained on).")
    if foreign.model and not same_model(foreign.model, name) and not force:
        raise UserError(
            f"checkpoint {foreign.folder} was trained on {foreign.model!r}, not {name!r}; pass the right --model, "
            f"or --force to use it with {name!r} anyway."
        )
    source = resolve_model(name)
    fingerprint = fingerprint_model(source, memo)
    spec = {"name": name, "kind": source.kind, "file": source.gguf_file, "revision": source.revision, **fingerprint}
    return spec, model_shape(source, fingerprint, memo)


def same_model(a: str, b: str) -> bool:
    """Whether two names refer to the same model: built-in alias, hub id, folder or GGUF file alike
    compare by their last path component (``HuggingFaceTB/SmolLM2-135M-Instruct`` = ``smollm2-135m``)."""
    return _canonical(a) == _canonical(b)


def _canonical(name: str) -> str:
    if name in BUILTIN_MODELS:
        name = BUILTIN_MODELS[name][1]
    last = name.rstrip("/").rsplit("/", 1)[-1].lower()
    return last.split(".")[0] if last.endswith(".gguf") else last


def run_name(foreign: Foreign, model: str) -> str:
    """``imported-<format>-<model>-<arch>-L<layer>-n<latents>-<weights hash>``."""
    digest = hashlib.sha256()
    for key in sorted(foreign.tensors):
        digest.update(key.encode() + foreign.tensors[key].numpy().tobytes())
    short = "".join(c if c.isalnum() or c in "-._" else "-" for c in _canonical(model))[:40]
    sae = foreign.sae
    return f"imported-{foreign.fmt}-{short}-{sae.arch}-L{foreign.layer}-n{sae.n_latents}-{digest.hexdigest()[:8]}"


def _record(foreign: Foreign, spec: dict[str, Any], forced: bool) -> dict[str, Any]:
    return {
        "status": "complete",
        "sae": foreign.sae.to_dict(),
        "cache": {
            "key": None,
            "path": None,
            "model": spec,
            "layers": foreign.sae.layers,
            "normalization": foreign.normalization.to_dict(),
            "ctx_len": foreign.context_size,
            "layer_convention": LAYER_CONVENTION,
        },
        "imported": {
            "format": foreign.fmt,
            "source": str(foreign.folder),
            "hook": foreign.hook,
            "checkpoint_model": foreign.model,
            "forced": forced and not (foreign.model and same_model(foreign.model, spec["name"])),
            "conventions": foreign.notes,
            "source_cfg": "source_cfg.json",
        },
    }


def _write(target: Folder, foreign: Foreign, record: dict[str, Any]) -> Folder:
    """Weights, the checkpoint's config and our cfg.json in a temporary folder, renamed into place."""
    parent = target.parent
    tmp = parent.child(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.makedirs()
    try:
        save_weights(tmp, foreign.module())
        shutil.copyfile(foreign.folder / "cfg.json", tmp.local() / "source_cfg.json")
        write_cfg(tmp, record)
        target.remove()  # an empty folder given as --out
        parent.rename(tmp.name, target.name)
    finally:
        tmp.remove()
    say(
        f"imported {foreign.fmt} {foreign.sae.arch} SAE at {foreign.hook} = layer {foreign.layer}: "
        + "; ".join(foreign.notes)
    )
    return target
