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
from dataclasses import dataclass
from typing import Any

from pipeline.cache.reader import ActivationCache
from pipeline.fit.config import SWEEPABLE, FitConfig, Training
from pipeline.fit.optim import auto_lr
from pipeline.infra.console import say
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.infra.layout import Layout
from pipeline.infra.params import coerce
from pipeline.llm.layers import layer_span, parse_layers, route_range
from pipeline.sae.folder import read_cfg
from pipeline.sae.interface import REGISTRY, SaeConfig, inference_only_archs, trainable_archs


@dataclass
class RunPlan:
    """One member of the sweep: its settings, architecture and folder."""

    cfg: FitConfig
    sae: SaeConfig
    training: Training
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
    if cfg.arch not in REGISTRY:
        raise UserError(f"unknown --arch {cfg.arch!r}; fit trains {', '.join(trainable_archs())}.")
    if cfg.arch in inference_only_archs():
        raise UserError(
            f"--arch {cfg.arch} is inference-only here (SAEs brought in with `sae-pipe import`); "
            f"fit trains {' or '.join(trainable_archs())}."
        )
    layers = _layers(cfg, cache)
    d_in = cache.d_model
    n_latents = cfg.latents or cfg.expansion * d_in
    sae_class = REGISTRY[cfg.arch]
    prefixes = sae_class.plan_prefixes(cfg.prefixes, n_latents)
    if cfg.skip and cfg.arch != "transcoder":
        raise UserError(f"--skip adds a skip path to a transcoder; --arch {cfg.arch} has none (use --arch transcoder).")
    if cfg.router_centre and not sae_class.default_router_lr:
        raise UserError(f"--router-centre centres a router's input; --arch {cfg.arch} has none (use --arch route).")
    sae = SaeConfig(
        cfg.arch, d_in, n_latents, cfg.k, layers, cfg.routing, cfg.aggregate, prefixes, cfg.skip, cfg.router_centre
    )
    if min(cfg.log_every, cfg.checkpoint_every) < 0:
        raise UserError("log_every and checkpoint_every must be >= 0.")
    spec = cache.manifest["spec"]
    router = sae_class.default_router_lr  # 0 for an architecture without a router: --router-lr is ignored
    router_lr = (cfg.router_lr or router) if router else 0.0
    training = Training.of(
        cfg,
        lr=cfg.lr or auto_lr(cfg.optimizer, n_latents, run_tokens(cfg, cache.rows("train")), cfg.batch_size),
        router_lr=router_lr,
        k_aux=cfg.k_aux or d_in // 2,
        dead_tokens=cfg.dead_tokens or auto_dead_tokens(n_latents, cfg.k),
    )
    record = {
        "sae": sae.to_dict(),
        "training": _training_record(training),
        "cache": {
            "key": cache.key,
            "path": cache.folder.url,
            "model": spec["model"],
            "layers": cache.layers,
            "normalization": cache.manifest["normalization"],
            **_site_normalization(cfg.arch, cache),
            "ctx_len": spec["ctx_len"],
            "layer_convention": cache.manifest["layer_convention"],
        },
    }
    hashed = {**record, "cache": {k: v for k, v in record["cache"].items() if k != "path"}}  # the key names it
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    arch = f"{cfg.arch}-skip" if cfg.skip else cfg.arch
    name = f"{cache.key.split('-L')[0]}-{arch}-{layer_span(layers)}-n{n_latents}-k{cfg.k}-{digest}"
    return RunPlan(cfg, sae, training, Folder.at(out_root(cfg)).child(name), record)


# Settings added after runs were first named, at their default: left out of cfg.json's training block, so
# runs trained before they existed keep their folder names (a TopK run's router_lr is 0: no router).
LATER_DEFAULTS: dict[str, Any] = {
    "router_lr": 0.0,
    "recipe": "sae-pipe",
    "multi_topk": False,
    "sparsity_coeff": 0.0,
    "sparsity_warmup": 0.05,
    "bandwidth": 0.0,
}


def _training_record(training: Training) -> dict[str, Any]:
    """cfg.json's training block, without the LATER_DEFAULTS settings that are at their default."""
    record = dataclasses.asdict(training)
    return {k: v for k, v in record.items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}


def fixed_lr_note(sweep: dict[str, Any], plans: list[RunPlan], train_rows: int) -> str | None:
    """A warning when one explicit --lr serves sweep members whose automatic rates differ (dictionary size,
    optimizer, run length or batch), unless the sweep varies lr itself: a rate tuned at one size trains another
    badly (Adam at 32768 latents and 1.4e-3, 0.8M tokens, left 23.5 % of latents untrained; auto_lr's doc)."""
    if "lr" in sweep or len(plans) < 2 or not all(p.cfg.lr for p in plans):
        return None
    autos = {
        (p.sae.n_latents, p.cfg.optimizer): auto_lr(
            p.cfg.optimizer, p.sae.n_latents, run_tokens(p.cfg, train_rows), p.cfg.batch_size
        )
        for p in plans
    }
    if len(set(autos.values())) < 2:
        return None
    rates = ", ".join(f"{lr:.2g} at {n} latents ({opt})" for (n, opt), lr in sorted(autos.items()))
    lrs = ", ".join(f"{lr:g}" for lr in sorted({p.cfg.lr for p in plans}))
    return (
        f"note: --lr {lrs} holds for every member of this sweep, while the automatic rate differs between them "
        f"({rates}); pass --lr 0 for each member's own rate, or sweep lr too."
    )


def run_tokens(cfg: FitConfig, train_rows: int, world: int = 1) -> int:
    """Training tokens the run will see (per rank, of ``world`` ranks sharing the budget): its epochs over
    the ``train_rows`` it reads, capped by max_tokens."""
    budget = train_rows * (cfg.epochs or 1)
    return min(budget, cfg.max_tokens // world) if cfg.max_tokens else budget


def auto_dead_tokens(n_latents: int, k: int) -> int:
    """64 x n_latents / k: the tokens in which a latent firing at the mean rate (k of n_latents per
    token) fires 64 times. A latent idle that long is far below its share, and AuxK works on it.

    A threshold tied to the dictionary, not the run, reaches the rare latents that a held-out split
    counts as dead. On the demo cache (benchmarks/RESULTS.md, 0.8M tokens, default lr) it left 0.02 % of
    4096 latents silent on the held-out tokens (was 1.4-2.1 % with 1/20 of the run, >= 50,000) and 2.9 % of
    16384 (was 6.5 %) at the same FVU; a fixed 10M (sparsify) never engages in a run this short.
    """
    return 64 * n_latents // k


def out_root(cfg: FitConfig) -> str:
    return cfg.out or str(Layout(cfg.cache_root).saes().url)


def _site_normalization(arch: str, cache: ActivationCache) -> dict[str, Any]:
    """How the MLP sites an architecture reads were scaled (transcoders), for splicing it back; nothing for
    the residual-stream architectures, whose cfg.json stays as it was."""
    sites = [site for site in REGISTRY[arch].sites if site != "resid"]
    return {"site_normalization": {site: cache.site_normalizer(site).to_dict() for site in sites}} if sites else {}


def _layers(cfg: FitConfig, cache: ActivationCache) -> list[int]:
    held = cache.layers
    sae_class = REGISTRY[cfg.arch]
    if sae_class.multi_layer and sae_class.sites == ("resid",):  # routes over layers (a transcoder reads sites)
        if len(held) < 2:
            raise UserError(
                f"RouteSAE needs a multi-layer cache; {cache.key} holds only layer {held}. "
                "Extract with --layers route (or several layers)."
            )
        if cfg.route_layers:
            layers = parse_layers(cfg.route_layers, cache.manifest["n_layers_model"])
        else:
            wanted = route_range(cache.manifest["n_layers_model"])
            layers = sorted(set(wanted) & set(held))
            if len(layers) < 2:
                raise UserError(
                    f"RouteSAE routes over layers {wanted[0]}..{wanted[-1]} (n/4..3n/4) by default, but cache "
                    f"{cache.key} holds {held}: extract with --layers route, or pass --route-layers with "
                    "two or more cached layers."
                )
        for layer in layers:
            cache.layer_index(layer)  # names the cache's layers when one is missing
        return layers
    missing = [site for site in REGISTRY[cfg.arch].sites if site not in cache.sites]
    if missing:
        raise UserError(
            f"--arch {cfg.arch} reads {', '.join(missing)}, which cache {cache.key} does not hold; extract it with "
            "--sites resid,mlp_in,mlp_out."
        )
    if cfg.layer is None:
        if len(held) > 1:
            raise UserError(f"cache {cache.key} holds layers {held}: pass --layer with one of them.")
        return held
    cache.layer_index(cfg.layer)
    return [cfg.layer]


def check_no_duplicates(plans: list[RunPlan]) -> None:
    """Two sweep members with one run folder would train the same SAE twice: refuse the repeated value."""
    names = [p.folder.name for p in plans]
    if len(set(names)) != len(names):
        raise UserError("the sweep lists the same setting twice; remove the duplicate values.")


def spread(plans: list[RunPlan], world: int) -> list[list[RunPlan]]:
    """Whole members per rank, balanced by cost (largest first, each to the least loaded rank).

    A member's step costs about latents x input width x layers it reads (the encoder GEMM and the
    Adam step over its weights); ties go to the lower rank, so every rank computes the same split.
    """
    shares: list[list[RunPlan]] = [[] for _ in range(world)]
    load = [0] * world
    for plan in sorted(plans, key=lambda p: (-_cost(p), p.folder.name)):
        rank = load.index(min(load))
        shares[rank].append(plan)
        load[rank] += _cost(plan)
    return shares


def _cost(plan: RunPlan) -> int:
    return plan.sae.n_latents * plan.sae.d_in * len(plan.sae.layers)  # one layer but for multi-layer SAEs


def prepare_run_folder(plan: RunPlan) -> bool:
    """Whether the run is to be trained: False for a finished run (kept, unless --overwrite); an error for an
    unfinished one without --resume. With --overwrite the old folder is removed here, before training."""
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
