"""`sae-pipe evaluate`: reconstruction metrics on held-out rows, and the SAE's cost to the model.

Fast metrics read only the cache. Spliced metrics re-run the LLM on held-out sequences three ways
(clean, SAE spliced in, residual stream zeroed) and compare logits; several runs at the same
layer share one clean and one zeroed forward per batch, and the blocks below the layer run once per
batch (splice.Branches): N runs cost 1 forward below the layer and 2 + N above it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.evaluate.compare import write_comparison
from pipeline.evaluate.config import METRICS, OPT_IN, SPLICES, EvaluateConfig
from pipeline.evaluate.core import CoreTap
from pipeline.evaluate.metrics import DEFINITIONS, ce_recovered
from pipeline.evaluate.suites import check_suites, suite_taps, write_suites
from pipeline.infra.console import progress_bar, say
from pipeline.infra.device import DTYPES, resolve_device
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.infra.layout import Layout
from pipeline.live.edit import EditSpec, Mode
from pipeline.live.routing import route_choice
from pipeline.live.splice import Branches, replays_exactly, site_edits, zero_edits
from pipeline.live.subject import Subject, encode_rows, load_llm, load_subject
from pipeline.llm.divergence import kl_sum, log_probs, next_token_ce_sum, reference
from pipeline.sae.interface import SaeOutput
from pipeline.sae.quality import Reconstruction

FAST_BATCH = 4096  # held-out rows per SAE forward
DENSE = 0.1  # a latent firing on more than this share of tokens counts as dense
LIVE = 1e-4  # one firing on more than this share counts as a live feature (the RouteSAE count of features)
SHOWN = ("nmse", "l0", "kl_per_token", "ce_recovered", "train_dead_share", "train_fvu")  # printed per run


@dataclass
class EvaluateResult:
    """What one evaluation wrote."""

    root: Folder  # <root>/<run>/metrics.json (and the suites' files) for each run
    metrics: list[dict[str, Any]]  # one per run, as its metrics.json holds it
    comparison: list[str] = field(default_factory=list)  # the comparison table and plots, when asked for


def run(cfg: EvaluateConfig, compare: bool = False) -> EvaluateResult:
    """Evaluate every run in ``cfg.runs`` into ``--out`` (default <cache_root>/evaluate); with ``compare``, write
    a table and plots comparing them beside the runs' folders."""
    root = Folder.at(cfg.out) if cfg.out else Layout(cfg.cache_root).evaluate()
    metrics = evaluated(cfg, root)
    return EvaluateResult(root, metrics, write_comparison(metrics, root) if compare else [])


def evaluated(cfg: EvaluateConfig, root: Folder) -> list[dict[str, Any]]:
    """Evaluate every run in ``cfg.runs``; write and return one metrics dict per run."""
    unknown = sorted(set(cfg.metrics) - {*METRICS, *OPT_IN})
    if unknown or not cfg.runs:
        raise UserError(
            f"unknown metric(s) {unknown}; choose from {', '.join((*METRICS, *OPT_IN))}."
            if unknown
            else "no run to evaluate: pass a run folder (or --all DIR)."
        )
    if cfg.splice not in SPLICES:
        raise UserError(f"unknown --splice {cfg.splice!r}; use one of {', '.join(SPLICES)}.")
    if cfg.compute_dtype not in ("cache", "auto", *DTYPES):
        raise UserError(f"unknown --compute-dtype {cfg.compute_dtype!r}; use one of cache, auto, {', '.join(DTYPES)}.")
    if cfg.batch_size < 1 or cfg.max_tokens < 0:
        raise UserError("--batch-size must be at least 1 and --max-tokens not negative (0 = all held-out tokens).")
    check_suites(cfg.suite)
    device = resolve_device(cfg.device)
    subjects = [load_subject(run, device, cfg.cache or None) for run in cfg.runs]
    taps = {id(s): suite_taps(s, cfg) for s in subjects}  # suites summing over the held-out pass below
    for subject in subjects:
        subject.check_infer_k(cfg.infer_k)
        _check_spliceable(subject, cfg)
        if "nmse" in cfg.metrics or subject.has_activations:  # an imported run may have only tokens (kl, ce)
            subject.result = fast_metrics(subject, cfg, list(taps[id(subject)].values()))
        if set(OPT_IN) & set(cfg.metrics):
            subject.result.update(training_metrics(subject, cfg))
    if {"kl", "ce"} & set(cfg.metrics):
        for same_cache in _group_by(subjects, lambda s: (s.cache.key,)):
            model, blocks = load_llm(same_cache[0].cache, device, cfg.compute_dtype)  # once per cache, not per layer
            for group in _group_by(same_cache, _forward_key):
                spliced_metrics(group, cfg, model, blocks)
    results = [write_metrics(s, cfg, root) for s in subjects]
    for s in subjects:
        write_suites(s, cfg, taps[id(s)])
    return results


def _check_spliceable(s: Subject, cfg: EvaluateConfig) -> None:
    """A soft-routed RouteSAE reconstructs a mix of layers, which no single layer of the model can take
    back, so KL / CE would measure something it was not trained on: refuse them (the reference does too)."""
    if s.soft_routed and {"kl", "ce"} & set(cfg.metrics):
        raise UserError(
            f"run {s.folder.name} uses soft routing: its reconstruction mixes layers and cannot be spliced "
            "into one layer, so KL / CE are not defined for it. Evaluate it with --metrics nmse, or train "
            "with --routing hard."
        )


def _forward_key(s: Subject) -> tuple[str, ...]:
    """Runs that can share clean/zeroed forwards: same single layer and sites (a transcoder's baseline ablates
    the MLP, an SAE's the residual stream); a RouteSAE routes alone."""
    return ("route", s.folder.name) if s.site().routed else (str(s.layers[0]), *s.sae.sites)


def _group_by(subjects: list[Subject], key: Callable[[Subject], tuple[str, ...]]) -> list[list[Subject]]:
    groups: dict[tuple[str, ...], list[Subject]] = {}
    for s in subjects:
        groups.setdefault(key(s), []).append(s)
    return list(groups.values())


@torch.no_grad()
def fast_metrics(s: Subject, cfg: EvaluateConfig, taps: Sequence[CoreTap] = ()) -> dict[str, Any]:
    """nmse, fvu, l0, dead share (and routing shares) over held-out rows of the cache; ``taps`` see every batch."""
    available = s.cache.rows("heldout")
    if available == 0:
        raise UserError(
            f"cache {s.cache.key} has no held-out tokens to evaluate on; re-extract it with "
            "--heldout above 0 (the default holds out 5 % of sequences)."
        )
    if cfg.max_tokens > available:
        raise UserError(
            f"--max-tokens {cfg.max_tokens:,} is more than the {available:,} held-out tokens of cache "
            f"{s.cache.key}; lower it (0 uses them all) or extract more tokens."
        )
    device = next(s.sae.parameters()).device
    n_latents = s.cfg["sae"]["n_latents"]
    fires = torch.zeros(n_latents, dtype=torch.int64, device=device)  # (N,) tokens each latent fired on
    routes = torch.zeros(len(s.layers), dtype=torch.float64, device=device)
    quality, l0_sum = Reconstruction(), 0.0
    for out in _encoded(s, cfg, "heldout", cfg.max_tokens):
        quality.add(out.x, out.x_hat)
        for tap in taps:
            tap.add(out)
        fired = out.latents.acts > 0  # (b, k)
        l0_sum += float(fired.sum())
        fires += torch.bincount(out.latents.indices[fired], minlength=n_latents)
        if out.layer_choice is not None:
            routes += torch.bincount(out.layer_choice, minlength=len(s.layers)).double()
        elif out.layer_weights is not None:
            routes += out.layer_weights.sum(0).double()
    n = quality.rows
    result: dict[str, Any] = {
        "nmse": quality.nmse,
        "fvu": quality.fvu,
        "l0": l0_sum / n,
        "dead_share": float((fires == 0).float().mean()),
        "dense_latents": int((fires > DENSE * n).sum()),
        "live_latents": int((fires > LIVE * n).sum()),
        "tokens_reconstructed": n,
    }
    if s.is_route:
        shares = (routes / routes.sum()).tolist()
        result["routing_shares"] = {str(layer): share for layer, share in zip(s.layers, shares)}
        result["top_route_share"] = max(shares)  # 1.0: the router collapsed onto one layer
    return result


@torch.no_grad()
def training_metrics(s: Subject, cfg: EvaluateConfig) -> dict[str, float]:
    """The opt-in metrics of the cache's training rows, asked for in ``cfg.metrics``, from one pass.

    train_dead: the share of latents active on none of them, dead as opposed to rare (a held-out split of
    21k tokens counts a latent firing once in 10,000 tokens as dead about 1 time in 8; over the training
    split, 0.4M rows in the demo, only a latent the data never reaches stays silent). train_fvu (with
    train_nmse and train_l0): the reconstruction of the rows the SAE was trained on and its L0 there (a
    threshold's L0 is not k), what a sweep's settings may be chosen by while the held-out split stays for
    reporting.
    """
    fired = torch.zeros(s.cfg["sae"]["n_latents"], dtype=torch.bool, device=next(s.sae.parameters()).device)
    quality, active = Reconstruction(), 0
    with progress_bar("training rows", s.cache.rows("train"), unit="tok") as bar:
        for out in _encoded(s, cfg, "train"):
            on = out.latents.acts > 0  # (b, k)
            fired[out.latents.indices[on]] = True
            quality.add(out.x, out.x_hat)
            active += int(on.sum())
            bar.advance(0, len(out.x))
    result = {}
    if "train_dead" in cfg.metrics:
        result["train_dead_share"] = float(1 - fired.float().mean())
    if "train_fvu" in cfg.metrics:
        result.update(train_fvu=quality.fvu, train_nmse=quality.nmse, train_l0=active / quality.rows)
    return result


def _encoded(s: Subject, cfg: EvaluateConfig, split: str, max_rows: int = 0) -> Iterator[SaeOutput]:
    """The SAE's output for the cache's rows of ``split``, FAST_BATCH rows at a time, encoded as asked
    (``--infer-k`` / ``--theta``)."""
    return encode_rows(s.sae, s.cache, s.layers, split, max_rows, FAST_BATCH, cfg.infer_k, cfg.theta)


@torch.no_grad()
def spliced_metrics(
    group: list[Subject], cfg: EvaluateConfig, model: torch.nn.Module, blocks: torch.nn.ModuleList
) -> None:
    """KL and CE with each run spliced in; clean and zeroed forwards are shared by the group."""
    tokens_np, mask_np = group[0].cache.heldout_sequences(cfg.max_tokens)
    device = next(model.parameters()).device
    sums = {id(s): {"kl": 0.0, "ce_spliced": 0.0} for s in group}
    shared = {
        "ce_clean": 0.0,
        "ce_zero": 0.0,
        "kl_zero": 0.0,
        "kl_positions": 0,
        "ce_positions": 0,
        "sequences": len(tokens_np),
    }
    layer = min(group[0].layers)  # every forward of the group differs only from here up
    probe = torch.from_numpy(tokens_np[:1, :16]).long().to(device)  # (1, 16): the check costs 3 short forwards
    replay = replays_exactly(model, blocks, probe, layer)
    with progress_bar("evaluate", int(mask_np.sum()), unit="tok") as bar:
        for start in range(0, len(tokens_np), cfg.batch_size):
            tokens = torch.from_numpy(tokens_np[start : start + cfg.batch_size]).long().to(device)  # (B, T)
            mask = torch.from_numpy(mask_np[start : start + cfg.batch_size]).to(device)  # (B, T)
            _batch(group, Branches(model, blocks, tokens, layer, replay, at=mask), mask, cfg, sums, shared)
            bar.advance(0, int(mask.sum()))
    for s in group:
        ce = {
            "ce_clean": shared["ce_clean"] / shared["ce_positions"],
            "ce_zero": shared["ce_zero"] / shared["ce_positions"],
            "ce_spliced": sums[id(s)]["ce_spliced"] / shared["ce_positions"],
        }
        s.result.update(
            {
                "kl_per_token": sums[id(s)]["kl"] / shared["kl_positions"],
                "kl_paper_scale": sums[id(s)]["kl"] / shared["sequences"],
                "kl_zero_per_token": shared["kl_zero"] / shared["kl_positions"],
                **ce,
                "ce_recovered": ce_recovered(ce["ce_clean"], ce["ce_spliced"], ce["ce_zero"]),
                "tokens_spliced": shared["kl_positions"],
                "sequences": shared["sequences"],
            }
        )


def _batch(
    group: list[Subject],
    branches: Branches,
    mask: torch.Tensor,
    cfg: EvaluateConfig,
    sums: dict[int, dict[str, float]],
    shared: dict[str, Any],
) -> None:
    """One batch of held-out sequences: clean, zeroed and every run's spliced forward."""
    model, blocks, tokens = branches.model, branches.blocks, branches.tokens
    clean_lp = log_probs(branches.clean())  # (n, V) at the real positions: one per forward serves KL and CE
    clean = reference(clean_lp)
    shared["ce_clean"] += next_token_ce_sum(clean_lp, tokens, mask)
    shared["kl_positions"] += int(mask.sum())
    shared["ce_positions"] += int((mask[:, :-1] & mask[:, 1:]).sum())  # a real token predicted from a real one
    first = group[0].site()  # a routed SAE is evaluated alone: the routing is its own
    routing = route_choice(model, blocks, first, tokens) if first.routed else None
    zeroed = log_probs(branches.edited(zero_edits(first, mask, routing)))
    shared["ce_zero"] += next_token_ce_sum(zeroed, tokens, mask)
    shared["kl_zero"] += kl_sum(clean, zeroed)
    splice = EditSpec(Mode.REPLACE, k=cfg.infer_k, theta=cfg.theta, undo_weight=cfg.splice == "scaled")
    for s in group:
        spliced = log_probs(branches.edited(site_edits(s.site(), mask, splice, routing)))
        sums[id(s)]["kl"] += kl_sum(clean, spliced)
        sums[id(s)]["ce_spliced"] += next_token_ce_sum(spliced, tokens, mask)


def write_metrics(s: Subject, cfg: EvaluateConfig, root: Folder) -> dict[str, Any]:
    """The run's metrics.json: ``<root>/<run>/metrics.json``."""
    metrics = {
        "format": "sae-pipe/metrics",
        "format_version": 1,
        "run": s.folder.name,
        "run_path": s.folder.url,
        "cache_key": s.cache.key,
        "arch": s.cfg["sae"]["arch"],
        "layers": s.layers,
        "n_latents": s.cfg["sae"]["n_latents"],
        "k": s.cfg["sae"]["k"],
        "settings": {"infer_k": cfg.infer_k, "theta": cfg.theta, "max_tokens": cfg.max_tokens, "splice": cfg.splice},
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.result.items()},
        "definitions": {k: v for k, v in DEFINITIONS.items() if k in s.result},
    }
    root.child(s.folder.name).write_json(metrics, "metrics.json")
    shown = {k: metrics[k] for k in SHOWN if k in metrics}
    say(f"evaluated {s.folder.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return metrics
