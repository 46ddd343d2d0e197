"""`sae-pipe import`: a SAELens or sparsify checkpoint (local folder or hub repo) as a normal run folder.

The run folder holds our cfg.json + sae.safetensors, so every command that takes a run takes it,
plus the checkpoint's own config, kept as ``source_cfg.json``. Its cfg.json has no cache of its own
(``cache.key`` and ``cache.path`` are null): it names the model (checked by fingerprint like a
cache's), the layer, and the normalization the SAE expects. The folder is written under a
temporary name and renamed when complete.

Its name ends in a hash of everything that makes the converted SAE compute what it computes: the
tensors and the whole converted cfg.json (architecture, sizes, k, layer, hook, normalization with its
constants and scaler, model fingerprint, source dtype), not where the checkpoint was read from. The same
conversion finds the run imported before; any other (another k, normalization or scaler) is a new run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.cache.manifest import LAYER_CONVENTION
from pipeline.cache.normalize import LAYER_NORM
from pipeline.infra.console import say
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder, Memo
from pipeline.infra.layout import Layout
from pipeline.interop.foreign import Foreign, read_json
from pipeline.interop.saelens import is_saelens, read_saelens
from pipeline.interop.saelens_fields import CENTRE, REGISTRY_CENTRED, TL_LAYER_NORM
from pipeline.interop.sparsify import BLOCK_OUTPUT, EMBEDDINGS, is_sparsify, read_sparsify
from pipeline.interop.transcoding import is_transcoder, read_saelens_transcoder, read_sparsify_transcoder
from pipeline.llm.model import BUILTIN_MODELS, ModelSource, fingerprint_model, model_shape, resolve_model
from pipeline.llm.sites import SITES
from pipeline.sae.folder import read_cfg, save_weights, write_cfg

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
    if foreign.centred is None and source in REGISTRY_CENTRED:
        foreign.centred = True
        foreign.notes.append(f"{CENTRE} true, as SAELens's pretrained registry states for {source}")
    root = Folder.at(cache_root)
    memo = Memo(root.local() / ".memo.json") if root.is_local else None
    spec, shape, resolved = _model_spec(foreign, model, force, memo)
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
    if foreign.centred is not False:
        _centre(foreign, resolved)
    record = _record(foreign, spec, force)
    target = Folder.at(out) if out else Layout(cache_root).saes(run_name(foreign, spec["name"], record))
    if not out and _imported_before(target, record):
        say(f"already imported: {target.url}")
        return target
    if target.exists() and target.list():
        raise UserError(f"{target.url} exists and is not empty; choose a new --out folder (nothing was overwritten).")
    return _write(target, foreign, record)


def _imported_before(target: Folder, record: dict[str, Any]) -> bool:
    """Whether ``target`` (named by the hash of this conversion) holds exactly this conversion already."""
    if not target.exists("cfg.json"):
        return False
    stored = read_cfg(target)
    if _identity({key: stored.get(key) for key in record}) != _identity(record):
        raise UserError(
            f"{target.url} holds another conversion than this one (its cfg.json was edited?); move it away "
            "or pass --out (nothing was overwritten)."
        )
    return True


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
    name = _own_name(sae_dir, folder, hookpoint)
    if is_transcoder(sae_dir, found):
        return read_saelens_transcoder(sae_dir) if found == "saelens" else read_sparsify_transcoder(sae_dir, name)
    return read_saelens(sae_dir) if found == "saelens" else read_sparsify(sae_dir, name)


def _pick(folder: Path, hookpoint: str | None) -> Path:
    """The folder of the one SAE to import: ``hookpoint``'s, or the only one; never another than asked for."""
    if (folder / "cfg.json").is_file():
        if hookpoint and not _is_named(folder, hookpoint):
            raise UserError(f"{folder} has no SAE at --hookpoint {hookpoint!r}; it holds one, at {_hook(folder)}.")
        return folder
    choices = sorted(str(p.parent.relative_to(folder)) for p in folder.glob("**/cfg.json"))
    if hookpoint and hookpoint in choices:
        return folder / hookpoint
    if not choices:
        raise UserError(f"{folder} holds no SAE checkpoint (no cfg.json in it or below it).")
    if len(choices) == 1 and not hookpoint:
        return folder / choices[0]
    listed = f"{', '.join(choices[:40])}{', ...' if len(choices) > 40 else ''}"
    if hookpoint:
        raise UserError(f"{folder} has no SAE at --hookpoint {hookpoint!r}; it holds {listed}. Choose one of those.")
    raise UserError(f"{folder} holds {len(choices)} SAEs ({listed}); choose one with --hookpoint.")


def _hook(sae_dir: Path) -> str:
    """The place a checkpoint folder reads, in its library's words (SAELens: its hook; sparsify: its folder)."""
    if is_saelens(sae_dir):
        cfg = read_json(sae_dir / "cfg.json")
        meta: dict[str, Any] = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
        return str(meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or sae_dir.name)
    return sae_dir.name


def _is_named(sae_dir: Path, hookpoint: str) -> bool:
    """Whether --hookpoint names this checkpoint folder: its hook or folder name, or (sparsify) a renamed folder
    whose own name is no hookpoint at all, which --hookpoint then supplies."""
    if hookpoint in (_hook(sae_dir), sae_dir.name):
        return True
    return is_sparsify(sae_dir) and not BLOCK_OUTPUT.fullmatch(sae_dir.name) and sae_dir.name not in EMBEDDINGS


def _own_name(sae_dir: Path, folder: Path, hookpoint: str | None) -> str | None:
    """A --hookpoint that names the checkpoint itself (not one of its subfolders) overrides its folder name."""
    return hookpoint if hookpoint and sae_dir == folder else None


def _model_spec(
    foreign: Foreign, model: str | None, force: bool, memo: Memo | None
) -> tuple[dict[str, Any], Any, ModelSource]:
    """The model block of cfg.json (name, kind, fingerprint), the model's shape and where it is, checked against
    the checkpoint."""
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
    return spec, model_shape(source, fingerprint, memo), source


def _centre(foreign: Foreign, source: ModelSource) -> None:
    """Apply (or show irrelevant) TransformerLens's centred writing weights, which only a LayerNorm model has."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.kind == "hub":
        kwargs["revision"] = source.revision
    try:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the config of model {source.name!r} ({str(err)[:120]}).") from None
    kind = str(getattr(config, "model_type", ""))
    arch = TL_LAYER_NORM.get(kind) or (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if kind in TL_LAYER_NORM and getattr(config, "do_layer_norm_before", True) is not False:
        if foreign.centred is None:
            raise UserError(
                f"checkpoint {foreign.folder} (a SAELens config from before 6.0) does not say whether its {arch} "
                "was loaded with centred writing weights, which on a LayerNorm model decides whether the SAE reads "
                f'x or x - mean(x). Add "model_from_pretrained_kwargs": {{"{CENTRE}": true}} (TransformerLens\'s '
                "default then; SAELens's registry sets it for jbloom's GPT-2 SAEs) or false to its cfg.json."
            )
        if foreign.normalization.method == LAYER_NORM:
            foreign.notes.append(f"{CENTRE}: layer_norm removes each token's mean already (exact, nothing added)")
        else:
            foreign.normalization = replace(foreign.normalization, center=True)
            foreign.notes.append(f"{CENTRE} on {arch} (LayerNorm): each token's mean subtracted first, added back")
    elif hasattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "rms_norm_eps"):
        foreign.notes.append(f"{CENTRE}: TransformerLens does not centre {arch} (RMSNorm), so nothing to apply")
    else:
        raise UserError(
            f"checkpoint {foreign.folder} was read from a TransformerLens model with {CENTRE}, and sae-pipe cannot "
            f"tell whether TransformerLens centres {arch} (it does for LayerNorm models only); not imported."
        )


def same_model(a: str, b: str) -> bool:
    """Whether two names refer to the same model: built-in alias, hub id, folder or GGUF file alike
    compare by their last path component (``HuggingFaceTB/SmolLM2-135M-Instruct`` = ``smollm2-135m``)."""
    return _canonical(a) == _canonical(b)


def _canonical(name: str) -> str:
    if name in BUILTIN_MODELS:
        name = BUILTIN_MODELS[name][1]
    last = name.rstrip("/").rsplit("/", 1)[-1].lower()
    return last.split(".")[0] if last.endswith(".gguf") else last


def run_name(foreign: Foreign, model: str, record: dict[str, Any]) -> str:
    """``imported-<format>-<model>-<arch>-L<layer>-n<latents>-<hash of the tensors and the converted cfg>``."""
    digest = hashlib.sha256()
    for key in sorted(foreign.tensors):
        digest.update(key.encode() + foreign.tensors[key].numpy().tobytes())
    digest.update(json.dumps(_identity(record), sort_keys=True).encode())
    short = "".join(c if c.isalnum() or c in "-._" else "-" for c in _canonical(model))[:40]
    sae = foreign.sae
    return f"imported-{foreign.fmt}-{short}-{sae.arch}-L{foreign.layer}-n{sae.n_latents}-{digest.hexdigest()[:8]}"


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    """The converted cfg without where it was read from (the same checkpoint anywhere is the same run)."""
    imported = {k: v for k, v in record.get("imported", {}).items() if k != "source"}
    return {**{k: v for k, v in record.items() if k != "imported"}, "imported": imported}


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
            # a transcoder reads and writes its MLP's sites as they are (exports fold the cache's factors in)
            **({"site_normalization": dict.fromkeys(SITES[1:], {"method": "none"})} if foreign.transcodes else {}),
            "ctx_len": foreign.context_size,
            "layer_convention": LAYER_CONVENTION,
        },
        "imported": {
            "format": foreign.fmt,
            "source": str(foreign.folder),
            "hook": foreign.hook,
            "dtype": foreign.dtype,
            "checkpoint_model": foreign.model,
            "forced": forced and not (foreign.model and same_model(foreign.model, spec["name"])),
            "conventions": foreign.notes,
            "source_cfg": "source_cfg.json",
        },
    }


def _write(target: Folder, foreign: Foreign, record: dict[str, Any]) -> Folder:
    """Weights, the checkpoint's config and our cfg.json in a temporary folder, swapped into place."""
    with target.replaced() as tmp:  # an empty folder given as --out is replaced
        save_weights(tmp, foreign.module())
        shutil.copyfile(foreign.folder / "cfg.json", tmp.local() / "source_cfg.json")
        write_cfg(tmp, record)
    say(
        f"imported {foreign.fmt} {foreign.sae.arch} SAE at {foreign.hook} = layer {foreign.layer}: "
        + "; ".join(foreign.notes)
    )
    return target
