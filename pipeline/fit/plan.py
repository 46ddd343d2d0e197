"""From fit settings to runs: the sweep's members, their layers and sizes, their folders' names,
and whether a folder still needs training (finished, resumable, or in the way).

A run's folder name comes from its architecture, layer, size and a hash of every setting that
shapes the result, so the same settings always land in the same folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from pipeline.cache.reader import ActivationCache
from pipeline.fit.optim import OPTIMIZERS, SCHEDULES, auto_lr
from pipeline.infra.console import say
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.infra.params import coerce
from pipeline.llm.layers import layer_span, parse_layers, route_range
from pipeline.sae.checkpoint import read_cfg
from pipeline.sae.topk import SaeConfig

# FitConfig fields that shape the training itself (cfg.json's `training` block and the run's hash)
TRAINING_KEYS = (
    "lr",
    "optimizer",
    "betas",
    "schedule",
    "batch_size",
    "max_tokens",
    "epochs",
    "seed",
    "data_seed",
    "dead_tokens",
    "k_aux",
    "aux_alpha",
    "precision",
)
SWEEPABLE = (
    "k",
    "latents",
    "expansion",
    "lr",
    "optimizer",
    "seed",
    "layer",
    "routing",
    "aggregate",
    "k_aux",
    "aux_alpha",
    "dead_tokens",
    "schedule",
)


@dataclass
class FitConfig:
    """Everything `sae-pipe fit` needs; every field also lives in params.yaml's fit section."""

    cache: str = ""  # cache folder or URL (the DVC stage passes the one extract made)
    arch: str = "topk"  # topk | route
    layer: int | None = None  # topk: model layer to train on (default: the cache's only layer)
    route_layers: str = ""  # route: layers to route over (default: n/4..3n/4 within the cache)
    latents: int = 0  # dictionary size (0 = expansion x hidden size)
    expansion: int = 8  # latents per input dimension, when latents = 0
    k: int = 32  # active latents per token
    routing: str = "hard"  # route: hard | soft
    aggregate: str = "sum"  # route: sum | mean of the routed layers as router input
    lr: float = 0.0  # peak learning rate (0 = auto: scaled by 1/sqrt(latents / 16384), see optim.auto_lr)
    optimizer: str = "adam"  # adam | signum
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas (signum: betas[0] is the momentum)
    schedule: str = "warmup-decay"  # warmup-decay (5 % warmup, decay over the last 20 %) | constant
    batch_size: int = 4096  # tokens per step
    max_tokens: int = 0  # training tokens (0 = the whole training split, `epochs` times)
    epochs: int = 0  # passes over the training split (0 = one; a larger budget needs --epochs)
    seed: int = 0  # weight initialization
    data_seed: int = 0  # shard order and shuffling (shared by all members of a sweep)
    dead_tokens: int = 1_000_000  # a latent idle this many tokens is dead (AuxK revives it)
    k_aux: int = 0  # AuxK latents (0 = hidden size / 2)
    aux_alpha: float = 1 / 32  # AuxK loss weight
    precision: str = "auto"  # encoder GEMM: auto (bf16 where the hardware has it) | float32 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10  # steps between log.csv rows (0 = the last step only)
    checkpoint_every: int = 100  # steps between resumable states (0 = none)
    pool_mb: float = 1024.0  # shuffle pool size
    verify: bool = True  # check the cache's checksums for the data read before training
    sweep: dict[str, list[Any]] = field(default_factory=dict)  # setting -> values; every combination is trained
    out: str = ""  # folder for run folders (default <cache_root>/saes)
    cache_root: str = "cache"  # root of activations/ and saes/
    resume: bool = False  # continue incomplete runs with identical settings
    overwrite: bool = False  # retrain runs that already finished


@dataclass
class RunPlan:
    """One member of the sweep: its settings, architecture and folder."""

    cfg: FitConfig
    sae: SaeConfig
    folder: Folder
    record: dict[str, Any]  # what goes into cfg.json


def expand_sweep(cfg: FitConfig) -> list[FitConfig]:
    """One config per combination of the sweep values (the config itself when there is no sweep)."""
    unknown = sorted(set(cfg.sweep) - set(SWEEPABLE))
    if unknown:
        raise UserError(f"cannot sweep {', '.join(unknown)}; sweepable settings: {', '.join(SWEEPABLE)}.")
    hints = typing.get_type_hints(FitConfig)
    grid = {
        key: [coerce(v, hints[key], f"sweep {key}") for v in (values if isinstance(values, list) else [values])]
        for key, values in cfg.sweep.items()
    }
    combos = itertools.product(*grid.values())
    return [dataclasses.replace(cfg, sweep={}, **dict(zip(grid, values))) for values in combos]


def parse_sweep(items: list[str]) -> dict[str, list[str]]:
    """``["k=32,64", "lr=1e-3"]`` -> ``{"k": ["32", "64"], "lr": ["1e-3"]}`` (typed by :func:`expand_sweep`)."""
    sweep: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or key not in SWEEPABLE or not values.strip():
            raise UserError(f"bad --sweep {item!r}: use key=v1,v2 with key one of {', '.join(SWEEPABLE)}.")
        sweep[key] = [v.strip() for v in values.split(",")]
    return sweep


def plan_run(cfg: FitConfig, cache: ActivationCache) -> RunPlan:
    """Resolve layers and sizes, check them against the cache, and name the run folder."""
    layers = _layers(cfg, cache)
    d_in = cache.d_model
    n_latents = cfg.latents or cfg.expansion * d_in
    sae = SaeConfig(cfg.arch, d_in, n_latents, cfg.k, layers, cfg.routing, cfg.aggregate)
    _check_settings(cfg)
    spec = cache.manifest["spec"]
    training = {key: getattr(cfg, key) for key in TRAINING_KEYS}
    training["lr"] = cfg.lr or auto_lr(cfg.optimizer, n_latents)
    training["k_aux"] = cfg.k_aux or d_in // 2
    record = {
        "sae": sae.to_dict(),
        "training": training,
        "cache": {
            "key": cache.key,
            "path": cache.folder.url,
            "model": spec["model"],
            "layers": cache.layers,
            "normalization": cache.manifest["normalization"],
            "ctx_len": spec["ctx_len"],
            "layer_convention": cache.manifest["layer_convention"],
        },
    }
    hashed = {**record, "cache": {k: v for k, v in record["cache"].items() if k != "path"}}  # the key names it
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = f"{cache.key.split('-L')[0]}-{cfg.arch}-{layer_span(layers)}-n{n_latents}-k{cfg.k}-{digest}"
    return RunPlan(cfg, sae, Folder.at(out_root(cfg)).child(name), record)


def out_root(cfg: FitConfig) -> str:
    return cfg.out or str(Folder.at(cfg.cache_root).child("saes").url)


def _layers(cfg: FitConfig, cache: ActivationCache) -> list[int]:
    held = cache.layers
    if cfg.arch == "route":
        if len(held) < 2:
            raise UserError(
                f"RouteSAE needs a multi-layer cache; {cache.key} holds only layer {held}. "
                "Extract with --layers route (or several layers)."
            )
        if cfg.route_layers:
            layers = parse_layers(cfg.route_layers, cache.manifest["n_layers_model"])
        else:
            wanted = set(route_range(cache.manifest["n_layers_model"])) & set(held)
            layers = sorted(wanted) if len(wanted) >= 2 else held
        for layer in layers:
            cache.layer_index(layer)  # names the cache's layers when one is missing
        return layers
    if cfg.layer is None:
        if len(held) > 1:
            raise UserError(f"cache {cache.key} holds layers {held}: pass --layer with one of them.")
        return held
    cache.layer_index(cfg.layer)
    return [cfg.layer]


def _check_settings(cfg: FitConfig) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; use one of {', '.join(OPTIMIZERS)}.")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"unknown lr schedule {cfg.schedule!r}; use one of {', '.join(SCHEDULES)}.")
    if min(cfg.max_tokens, cfg.epochs, cfg.lr, cfg.log_every, cfg.checkpoint_every) < 0 or cfg.batch_size < 1:
        raise UserError(
            "--batch-size must be positive; --lr (0 = auto), --max-tokens, --epochs, log_every and "
            "checkpoint_every must be >= 0."
        )


def check_shared(plans: list[RunPlan]) -> None:
    names = [p.folder.name for p in plans]
    if len(set(names)) != len(names):
        raise UserError("the sweep lists the same setting twice; remove the duplicate values.")


def needs_training(plan: RunPlan) -> bool:
    """False for a finished run (kept, unless --overwrite); errors for an unfinished one without --resume."""
    folder, cfg = plan.folder, plan.cfg
    if not folder.exists("cfg.json"):
        if cfg.resume:
            raise UserError(_nothing_to_resume(plan))
        return True
    status = read_cfg(folder).get("status")
    if status == "complete" and not cfg.overwrite:
        say(f"already trained, kept: {folder.url} (pass --overwrite to train it again)")
        return False
    if status != "complete" and not cfg.resume and not cfg.overwrite:
        raise UserError(
            f"run {folder.url} exists but did not finish; pass --resume to continue it "
            "or --overwrite to start it again."
        )
    if cfg.overwrite:
        folder.remove()
    return True


def _nothing_to_resume(plan: RunPlan) -> str:
    """Explain a --resume that matches no unfinished run, naming the settings that differ."""
    root = Folder.at(out_root(plan.cfg))
    lines = []
    for name in root.list():
        if name.startswith(".") or not root.child(name).exists("cfg.json"):
            continue
        other = read_cfg(root.child(name))
        if other.get("status") == "complete" or other.get("cache", {}).get("key") != plan.record["cache"]["key"]:
            continue
        mine = {**plan.record["sae"], **plan.record["training"]}
        theirs = {**other["sae"], **other["training"]}
        diff = [
            f"{k}: saved {theirs.get(k)!r}, now {v!r}"
            for k, v in mine.items()
            if json.dumps(theirs.get(k), default=str) != json.dumps(v, default=str)
        ]
        lines.append(f"  {name}: " + "; ".join(diff))
    if not lines:
        return f"--resume: there is no unfinished run to continue under {root.url}."
    return (
        "--resume: the settings differ from every unfinished run, so none can be continued:\n"
        + "\n".join(lines)
        + "\nRun with the saved settings, or drop --resume to start a new run."
    )
