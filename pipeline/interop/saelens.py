"""SAELens's layout and conventions, both ways (measured from sae-lens 6.54.12: benchmarks/peers/NOTES.md).

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` with ``W_enc (d_in, d_sae)``,
``W_dec (d_sae, d_in)``, ``b_dec`` and per architecture ``b_enc`` (standard, topk, jumprelu),
``threshold`` (jumprelu; older files: ``log_threshold``) or ``b_gate``, ``r_mag``, ``b_mag`` (gated).
Configs from 6.0 on keep the model and hook under ``metadata``; older ones are flat (``hook_point``,
``activation_fn: topk`` with ``activation_fn_kwargs.k``, a boolean ``normalize_activations``).

Conventions and how they map (exactly, or refused):

* ``blocks.L.hook_resid_pre`` is our layer L; ``blocks.L.hook_resid_post`` is layer L + 1.
* ``apply_b_dec_to_input: false``: the encoder bias absorbs ``W_enc^T b_dec`` (gated: both biases,
  the magnitude one times ``exp(r_mag)``), since our encoders always subtract ``b_dec`` first.
* topk ``rescale_acts_by_decoder_norm``: the decoder row norms are folded into the encoder.
* ``normalize_activations``: ``none``; ``layer_norm`` (our ``layer_norm`` method, eps 1e-5);
  ``expected_average_only_in`` with its factor in ``activation_scaler.json`` (our ``scale``).
  ``constant_norm_rescale`` and ``covariance_whitening`` have no exact equivalent: refused.
  sae-pipe's own exports also record their exact normalization (``metadata.sae_pipe_normalization``,
  e.g. ``standardize`` with eps 1e-6, which SAELens approximates by ``layer_norm``): read back as it was.
* ``model_from_pretrained_kwargs.center_writing_weights``: TransformerLens then centres every write to the
  residual stream of a LayerNorm model, so the SAE reads x - mean(x); mapped to our ``center`` flag
  (pipeline.interop.importing decides it against the model, which SAELens's config does not describe).
* Every other field is in exactly one table of :mod:`pipeline.interop.saelens_fields` (applied here, or shown
  not to change what the SAE computes); a field in none of them is refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.normalize import LAYER_NORM, Normalizer
from pipeline.infra.errors import UserError
from pipeline.interop.foreign import Foreign, check_arch, check_fields, check_tensors, load_tensors, read_json, whole
from pipeline.interop.saelens_fields import APPLIED, CENTRE, KNOWN, OWN, SAME_STREAM
from pipeline.sae.interface import SaeConfig

CFG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"
ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}  # theirs -> ours
# ours -> theirs, for export. SAELens saves its BatchTopK and Matryoshka BatchTopK trainers as inference JumpReLU
# SAEs: the one batch-estimated threshold becomes every latent's threshold (sae_lens/saes/batchtopk_sae.py,
# BatchTopKTrainingSAE.process_state_dict_for_saving_inference, inherited by matryoshka_batchtopk_sae.py; the config
# from get_inference_config_class = JumpReLUSAEConfig) and the trainer is named in metadata.training_architecture
# (sae_lens/saes/sae.py, _metadata_with_training_info). Neither trainer is an inference class SAE.load_from_disk
# builds. A Matryoshka SAE exports at its full size (the inference form of its outer prefix).
THEIRS = {
    **{ours: theirs for theirs, ours in ARCHITECTURES.items()},
    **{"standard": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu"},
}
TRAINED_AS = {"batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk"}  # SAELens's names of those trainers
LAYER_NORM_EPS = 1e-5  # SAELens's, fixed in its code
HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")
VERSION = "6.54.12"  # the version whose loader the written layout was checked against


def is_saelens(folder: Path) -> bool:
    """A folder in SAELens's layout (its weights file, or a config only SAELens writes)."""
    return (folder / WEIGHTS).is_file() or ((folder / CFG).is_file() and "d_sae" in read_json(folder / CFG))


def modern(raw: dict[str, Any]) -> bool:
    """Whether a config was written by SAELens 6 or later (model and hook under ``metadata``)."""
    meta: dict[str, Any] = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
    version = str(raw.get("sae_lens_version") or meta.get("sae_lens_version") or "0")
    return version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 6


def settings(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields sae-pipe uses, from a 6.x config or an older flat one."""
    if modern(raw):
        meta = raw.get("metadata") or {}
        return {**raw, **{k: meta[k] for k in meta if k in APPLIED}}
    s = {**raw, "architecture": raw.get("architecture", "standard")}
    s["hook_name"] = raw.get("hook_name", raw.get("hook_point"))
    s["hook_layer"] = raw.get("hook_layer", raw.get("hook_point_layer"))
    s["hook_head_index"] = raw.get("hook_head_index", raw.get("hook_point_head_index"))
    s["activation_fn"] = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
    if s["activation_fn"] == "topk":
        s["architecture"], s["k"] = "topk", (raw.get("activation_fn_kwargs") or {}).get("k", raw.get("k"))
    if isinstance(raw.get("normalize_activations"), bool):
        s["normalize_activations"] = "expected_average_only_in" if raw["normalize_activations"] else "none"
    return s


def hook_layer(hook: str | None, where: Path) -> int:
    """Our layer index for a SAELens hook name."""
    match = HOOK.fullmatch(hook or "")
    if not match:
        raise UserError(
            f"checkpoint {where} reads hook {hook!r}, which is not the residual stream between blocks; sae-pipe "
            "imports SAEs on blocks.L.hook_resid_pre / hook_resid_post (attention, MLP, mid-block hooks: refused)."
        )
    return int(match[1]) + (match[2] == "post")


def their_shapes(arch: str, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    extra = {"gated": ("b_gate", "r_mag", "b_mag"), "jumprelu": ("b_enc", "threshold")}.get(arch, ("b_enc",))
    return {**shapes, **{name: (d_sae,) for name in extra}}


def read_saelens(folder: Path) -> Foreign:
    """One SAELens SAE folder in our conventions."""
    raw = read_json(folder / CFG)
    check_fields(raw, KNOWN, folder / CFG, "SAELens")
    if isinstance(raw.get("metadata"), dict):
        check_fields(raw["metadata"], KNOWN, folder / CFG, "SAELens (metadata)")
    s = settings(raw)
    arch = check_arch(str(s.get("architecture")), folder, ARCHITECTURES)
    if "d_in" not in s or "d_sae" not in s or (arch == "topk" and s.get("k") is None):
        raise UserError(f"{folder / CFG} lacks d_in, d_sae (or k for topk); it is not a complete SAELens config.")
    d_in, d_sae = whole(s, "d_in", folder / CFG), whole(s, "d_sae", folder / CFG)
    k = whole(s, "k", folder / CFG) if arch == "topk" else 0
    if arch == "topk" and k >= d_sae:
        raise UserError(f"k={k} in {folder / CFG} is not below d_sae={d_sae}; a top-k SAE keeps fewer latents.")
    refuse_unmapped(s, arch, folder)
    layer = hook_layer(s.get("hook_name"), folder)
    stated = s.get("hook_layer")
    if stated is not None and stated != int(HOOK.fullmatch(str(s["hook_name"]))[1]):  # type: ignore[index]
        raise UserError(f"{folder / CFG} says hook_layer {stated!r} but hook {s['hook_name']}; which one is meant?")
    tensors = load_tensors(folder, WEIGHTS)
    notes = ["W_enc transposed from (d_in, d_sae) to (d_sae, d_in)"]
    if arch == "jumprelu" and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").float().exp()
        notes.append("threshold = exp(log_threshold) (an older JumpReLU file)")
    check_tensors(folder, tensors, their_shapes(THEIRS[arch], d_in, d_sae))
    trainer = (raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}).get("training_architecture")
    if trainer not in (None, s["architecture"]):
        notes.append(f"trained as {trainer}, saved in its inference form {s['architecture']}")
    own = s.get(OWN)
    return Foreign(
        "saelens",
        folder,
        SaeConfig(arch, d_in, d_sae, k, [layer]),
        ours_layout(arch, tensors, s, notes),
        Normalizer.from_dict(own)
        if own
        else _normalization(str(s.get("normalize_activations") or "none"), folder, layer, notes),
        str(s.get("hook_name")),
        s.get("model_name"),
        s.get("context_size"),
        notes,
        False if own else centred(s, raw, folder),  # our exports carry their centring in their normalization
        str(s.get("dtype")) if s.get("dtype") is not None else None,
    )


def refuse_unmapped(s: dict[str, Any], arch: str, folder: Path) -> None:
    """Config values that change what the SAE reads or computes and have no exact equivalent here."""
    if s.get("reshape_activations", "none") != "none" or s.get("hook_head_index") is not None:
        raise UserError(f"checkpoint {folder} reads attention heads (hook_z); sae-pipe imports residual-stream SAEs.")
    if s.get("finetuning_scaling_factor"):
        raise UserError(
            f"checkpoint {folder} uses a finetuning scaling factor (SAELens < 6); sae-pipe does not map it."
        )
    outputs = [
        name
        for name in ("hook_name_out", "hook_head_index_out", "hf_hook_name", "hf_hook_name_out")
        if s.get(name) is not None
    ]
    if outputs:
        raise UserError(
            f"checkpoint {folder} sets {', '.join(outputs)} (a transcoder or a hook of a plain Hugging Face model); "
            "sae-pipe imports SAEs of one TransformerLens residual-stream hook."
        )
    if s.get("model_class_name") not in (None, "HookedTransformer"):
        raise UserError(
            f"checkpoint {folder} was trained on a {s['model_class_name']} model; sae-pipe maps the hooks of "
            "TransformerLens's HookedTransformer only."
        )
    if s.get("model_kwargs"):
        raise UserError(f"checkpoint {folder} ran the model with extra model_kwargs {s['model_kwargs']!r}; not mapped.")
    activation = s.get("activation_fn")
    if activation is not None and activation != {"topk": "topk"}.get(arch, "relu"):
        raise UserError(f"checkpoint {folder} is a {arch} SAE with activation {activation!r}; not mapped.")


def centred(s: dict[str, Any], raw: dict[str, Any], folder: Path) -> bool | None:
    """Whether the SAE read a TransformerLens model loaded with centred writing weights (None: not stated).

    SAELens 6 loads the model with ``from_pretrained_no_processing(**model_from_pretrained_kwargs)``, which
    centres nothing unless asked. Older versions loaded it with TransformerLens's own defaults (centred), so an
    older config that names no kwargs does not say.
    """
    kwargs = s.get("model_from_pretrained_kwargs")
    if kwargs is None:
        return False if modern(raw) else None
    if not isinstance(kwargs, dict):
        raise UserError(f"model_from_pretrained_kwargs in {folder / CFG} is {kwargs!r}, not an object.")
    other = sorted(set(kwargs) - SAME_STREAM - {CENTRE})
    if other:
        raise UserError(
            f"checkpoint {folder} loaded its model with {', '.join(other)} (model_from_pretrained_kwargs), which can "
            "change the residual stream the SAE read; sae-pipe does not map it."
        )
    flag = kwargs.get(CENTRE, False if modern(raw) else None)
    if flag is not None and not isinstance(flag, bool):
        raise UserError(f"{CENTRE} in {folder / CFG} is {flag!r}, not true or false.")
    return flag


def ours_layout(
    arch: str, theirs: dict[str, torch.Tensor], s: dict[str, Any], notes: list[str]
) -> dict[str, torch.Tensor]:
    """Their tensors in our names and layout, with the bias and decoder-norm conventions folded in."""
    t = {("b_enc" if name == "b_gate" else name): value.float() for name, value in theirs.items()}
    t["W_enc"] = t["W_enc"].T.contiguous()  # (N, D)
    if not s.get("apply_b_dec_to_input", True):
        shift = t["W_enc"] @ t["b_dec"]  # (N,) what subtracting b_dec first takes away
        t["b_enc"] = t["b_enc"] + shift
        if arch == "gated":
            t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
        notes.append("apply_b_dec_to_input false: W_enc^T b_dec added to the encoder bias(es)")
    if arch == "topk" and s.get("rescale_acts_by_decoder_norm", False):
        norms = t["W_dec"].norm(dim=-1)  # (N,)
        t["W_enc"], t["b_enc"], t["W_dec"] = (
            t["W_enc"] * norms[:, None],
            t["b_enc"] * norms,
            t["W_dec"] / norms[:, None],
        )
        notes.append("rescale_acts_by_decoder_norm: decoder row norms folded into the encoder")
    return t


def _normalization(method: str, folder: Path, layer: int, notes: list[str]) -> Normalizer:
    if method == "none":
        return Normalizer("none")
    if method == "layer_norm":
        notes.append("normalize_activations layer_norm: our layer_norm method, eps 1e-5")
        return Normalizer(LAYER_NORM, LAYER_NORM_EPS)
    if method == "expected_average_only_in":
        factor = read_json(folder / SCALER).get("scaling_factor") if (folder / SCALER).is_file() else None
        if not isinstance(factor, int | float) or not factor > 0:
            raise UserError(
                f"checkpoint {folder} uses normalize_activations expected_average_only_in but has no scaling factor "
                f"({SCALER}); without it the input scale is unknown. Add the file, or fold the factor into the weights."
            )
        notes.append(f"expected_average_only_in: our `scale` method with the factor {factor} of {SCALER}")
        return Normalizer("scale", scales={layer: float(factor)})
    raise UserError(
        f"checkpoint {folder} uses normalize_activations {method!r}, which has no exact equivalent in sae-pipe "
        "(none, layer_norm and expected_average_only_in with its factor are mapped)."
    )


def saelens_files(
    arch: str, tensors: dict[str, torch.Tensor], sizes: dict[str, Any], normalize: str, meta: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """cfg.json and the weights of an SAE in SAELens's layout (our tensors already have `scale` folded in)."""
    trained: dict[str, Any] = {}
    if arch in TRAINED_AS:  # as SAELens records the trainer of an SAE it saves in inference form
        details = {"k": sizes["k"], **({"matryoshka_widths": sizes["prefixes"]} if sizes.get("prefixes") else {})}
        trained = {"training_architecture": TRAINED_AS[arch], "training_architecture_details": details}
    config = {
        "architecture": THEIRS[arch],
        "d_in": sizes["d_in"],
        "d_sae": sizes["n_latents"],
        **({"k": sizes["k"], "rescale_acts_by_decoder_norm": False} if arch == "topk" else {}),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "reshape_activations": "none",
        "normalize_activations": normalize,
        "metadata": {"sae_lens_version": VERSION, **meta, **trained},
    }
    return config, their_weights(THEIRS[arch], tensors, sizes["n_latents"])


def their_weights(theirs: str, t: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Our tensors under the names SAELens's ``theirs`` architecture loads; training-only state stays out."""
    weights = {"W_enc": t["W_enc"].T, "W_dec": t["W_dec"], "b_dec": t["b_dec"]}  # W_enc (D, N)
    if theirs == "gated":
        weights.update(b_gate=t["b_enc"], r_mag=t["r_mag"], b_mag=t["b_mag"])
    else:
        weights["b_enc"] = t["b_enc"]
    if theirs == "jumprelu":  # SAELens's inference JumpReLU loads `threshold` only (no log_threshold conversion)
        threshold = t["threshold"] if "threshold" in t else t["log_threshold"].exp()  # (N,) or () for BatchTopK
        weights["threshold"] = threshold.expand(n)  # (N,)
    return {name: value.contiguous() for name, value in weights.items()}
