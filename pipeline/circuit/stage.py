"""`sae-pipe circuit`: SAEs at a few layers + the LLM + a task -> circuits of many sizes, measured on held-out pairs.

Outputs under <cache-root>/circuits/<task>-<hash>/ (see :mod:`pipeline.circuit.outputs`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pipeline.circuit.config import ABLATIONS, METHODS, CircuitConfig
from pipeline.circuit.measures import Ends, ends, faithfulness, jaccard, measure
from pipeline.circuit.methods import Lens, MaskHyper, attributions, top_circuits, train_masks
from pipeline.circuit.outputs import Found, write_outputs
from pipeline.circuit.spliced import Batch, ablation_values, batches, single_layer
from pipeline.circuit.tasks import Pair, load_task, split
from pipeline.infra.console import Stopwatch, say
from pipeline.infra.device import resolve_device
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder, sha256_file
from pipeline.infra.layout import Layout
from pipeline.live.subject import Subject, go_live, load_subject

PARTS = ("train", "val", "test")
SOLVED = 0.5  # a task the model gets right on fewer train pairs than this is reported as not solved


def check(cfg: CircuitConfig) -> None:
    unknown = sorted(set(cfg.method) - set(METHODS))
    if unknown or not cfg.method:
        raise UserError(f"unknown --method {','.join(unknown) or '(none)'}; use some of {','.join(METHODS)}.")
    if cfg.ablation not in ABLATIONS:
        raise UserError(f"unknown --ablation {cfg.ablation!r}; use one of {', '.join(ABLATIONS)}.")
    if "mask" in cfg.method and (not cfg.lambdas or not all(math.isfinite(x) and x >= 0 for x in cfg.lambdas)):
        raise UserError(f"--lambdas {cfg.lambdas} must be one or more finite non-negative numbers for the mask method.")
    if min(cfg.steps, cfg.ig_steps, cfg.batch_size, cfg.pairs, *cfg.sizes) < 1:
        raise UserError("--steps, --ig-steps, --batch-size, --pairs and --sizes must be at least 1.")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError(f"--lr {cfg.lr} must be a finite number above 0 (the mask's Adam step), e.g. 0.1.")
    if not (math.isfinite(cfg.t_max) and cfg.t_max >= 1):
        raise UserError(f"--t-max {cfg.t_max} must be a finite number of at least 1 (the final mask temperature).")
    if not (math.isfinite(cfg.min_gap) and cfg.min_gap >= 0):
        raise UserError(f"--min-gap {cfg.min_gap} must be a finite number of at least 0 (a logit difference).")
    if not (0 < cfg.test_share < 1 and 0 < cfg.val_share < 1 and cfg.test_share + cfg.val_share < 1):
        raise UserError(
            f"--val-share {cfg.val_share} and --test-share {cfg.test_share} must each be between 0 and 1 and "
            "leave pairs to train on (their sum below 1), e.g. 0.25 and 0.5."
        )
    if cfg.seeds and "mask" not in cfg.method:
        raise UserError(f"--seeds {cfg.seeds} re-runs the mask method; add mask to --method or leave --seeds out.")


def open_sites(runs: list[str], layers: list[int], device: torch.device) -> list[Subject]:
    """The runs to splice, one single-layer run per layer (any architecture), all from caches of one model."""
    if not runs:
        raise UserError("no run given: pass one SAE run folder per layer, e.g. `sae-pipe circuit RUN_L6 RUN_L12`.")
    subjects = [load_subject(run, device) for run in runs]
    for s in subjects:
        single_layer(s.site())
    chosen = [s for s in subjects if not layers or s.layers[0] in layers]
    missing = sorted(set(layers) - {s.layers[0] for s in chosen})
    if missing:
        raise UserError(
            f"--layers {missing} have no run among those given (their layers: {[s.layers[0] for s in subjects]})."
        )
    models = {json.dumps({k: s.cache.manifest["spec"]["model"].get(k) for k in ("sha256", "commit")}) for s in chosen}
    if len(models) > 1:
        raise UserError("the runs come from caches of different models; a circuit needs SAEs of one model.")
    seen = [s.layers[0] for s in chosen]
    if len(set(seen)) != len(seen):
        raise UserError(f"two runs read the same layer ({sorted(seen)}); give one run per layer.")
    return sorted(chosen, key=lambda s: s.layers[0])


def out_folder(cfg: CircuitConfig, subjects: list[Subject]) -> Folder:
    """<cache-root>/circuits/<task>-<hash of every setting that changes the result>, or --out."""
    if cfg.out:
        return Folder.at(cfg.out)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("runs", "device", "cache_root", "out")}
    settings["saes"] = [sha256_file(s.folder.local() / "sae.safetensors") for s in subjects]
    task = Path(cfg.task)
    if task.is_file():
        settings["task_file"] = sha256_file(task)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Layout(cfg.cache_root).circuits(f"{task.stem}-{digest}")


class Split(NamedTuple):
    """One seed's train/validation/test split of the pairs, with the model's ends measured on each part."""

    seed: int
    train: list[Batch]  # the mask and the attributions learn here
    val: list[Batch]  # the lambda or size of the reported circuit is chosen here
    test: list[Batch]  # every reported number is measured here
    lens: Lens  # its ablation values are the means over this split's train patch prompts
    ends: dict[str, Ends]  # train / val / test


def prepare(cfg: CircuitConfig, pairs: list[Pair], seed: int, spliced: Lens, special: set[int]) -> Split:
    """The split of ``pairs`` drawn by ``seed``, batched, with its ablation values and ends."""
    device = spliced.sites[0].sae.device
    train, val, test = (
        batches(part, cfg.batch_size, special, device) for part in split(pairs, cfg.val_share, cfg.test_share, seed)
    )
    means = ablation_values(spliced.model, spliced.blocks, spliced.sites, train, cfg.ablation)
    lens = spliced._replace(ablate=means)
    return Split(seed, train, val, test, lens, {k: ends(lens, v) for k, v in zip(PARTS, (train, val, test))})


def unsolved(cfg: CircuitConfig, part: Split) -> str:
    """Why no circuit can be claimed for the task on these train pairs ('' when it is solved)."""
    train = part.ends["train"]
    if train.gap < cfg.min_gap:
        return (
            f"the clean-minus-all-ablated logit difference on the train pairs is {train.gap:.3f}, below --min-gap "
            f"{cfg.min_gap:g}: the SAE latents carry too little of task {cfg.task} to place a circuit between "
            "the two ends; try more pairs, other layers, or a task the model solves"
        )
    if train.solved < SOLVED:
        return (
            f"the model prefers the clean answer on only {train.solved:.0%} of the train pairs: it does not "
            f"solve task {cfg.task}, so there is no circuit of it to find"
        )
    return ""


@dataclass
class CircuitResult:
    """What one circuit search wrote."""

    folder: Folder  # circuit.json, curve.csv, curve.png, scores.safetensors, index.html
    summary: dict[str, Any]  # circuit.json's document: the verdict, the chosen circuit, the pairs, the seconds


def run(cfg: CircuitConfig) -> CircuitResult:
    """Find circuits with every method of ``cfg``, choose one on the validation pairs, measure all on the test
    pairs, write the outputs."""
    check(cfg)
    clock = Stopwatch()
    device = resolve_device(cfg.device)
    subjects = open_sites(cfg.runs, cfg.layers, device)
    live = go_live(subjects[0])  # the model every run's cache came from
    pairs = load_task(cfg.task, live.tokenizer, cfg.pairs, cfg.seed)
    live.model.requires_grad_(False)  # only the masks learn; no gradient buffers for the model's weights
    sites = [s.site() for s in subjects]
    for site in sites:
        site.sae.requires_grad_(False)
    spliced = Lens(live.model, live.blocks, sites, [])  # the ablation values come with each split
    special = set(live.special)
    main = prepare(cfg, pairs, cfg.seed, spliced, special)
    counts = {k: sum(len(b.clean) for b in getattr(main, k)) for k in PARTS}
    train = main.ends["train"]
    say(
        f"circuit: task {cfg.task}: {counts['train']} train / {counts['val']} validation / {counts['test']} test "
        f"pairs; on the train pairs clean logit difference {float(train.full.mean()):.3f} (positive on "
        f"{train.solved:.0%}), all latents ablated {float(train.empty.mean()):.3f}"
    )
    why = unsolved(cfg, main)
    found = [] if why else find(cfg, main)
    reruns = [  # the mask again on each further seed's split, for the overlap across seeds
        f
        for seed in ([] if why else dict.fromkeys(cfg.seeds))
        if seed != cfg.seed
        for f in masks(cfg, prepare(cfg, pairs, seed, spliced, special))
    ]
    facts: dict[str, Any] = {
        "task": cfg.task,
        "pairs": counts,
        "baseline": {k: summary(v) for k, v in main.ends.items()},
        "solved": not why,
        "stability": stability(found, reruns),
        "config": asdict(cfg),
    }
    out = out_folder(cfg, subjects)
    document = write_outputs(out, subjects, found, reruns, {**facts, "why": why}, cfg.cache_root, clock)
    say(f"circuit: {document['message']}")
    return CircuitResult(out, document)


def summary(part: Ends) -> dict[str, float]:
    """The ends of one part of the pairs as circuit.json reports them."""
    return {"full": float(part.full.mean()), "empty": float(part.empty.mean()), "gap": part.gap, "solved": part.solved}


def masks(cfg: CircuitConfig, part: Split) -> list[Found]:
    """The mask method's circuits, one per lambda, trained together on ``part``'s train pairs."""
    lams = sorted(cfg.lambdas)
    train = part.ends["train"]
    targets = list(train.full.to(part.lens.sites[0].sae.device).split([len(b.clean) for b in part.train]))
    hyper = MaskHyper(cfg.steps, cfg.lr, cfg.t_max)
    trained = train_masks(part.lens, part.train, targets, train.gap, lams, hyper, part.seed)
    return [judged(part, "mask", lam, [m > 0 for m in logits], logits) for lam, logits in zip(lams, trained)]


def judged(part: Split, method: str, param: float, chosen: list[Tensor], scores: list[Tensor]) -> Found:
    """One circuit with its validation faithfulness (to choose by) and its test measures (to report)."""
    val = faithfulness(part.lens, part.val, part.ends["val"], chosen)
    test = measure(part.lens, part.test, part.ends["test"], chosen)
    return Found(method, param, part.seed, chosen, scores, val, test)


def find(cfg: CircuitConfig, part: Split) -> list[Found]:
    """Every method's circuits on one split."""
    found = masks(cfg, part) if "mask" in cfg.method else []
    for method, steps in (("ig", cfg.ig_steps), ("ig_layer", cfg.ig_steps), ("attrib", 1)):
        if method in cfg.method:
            scores = attributions(part.lens, part.train, steps, per_site=method == "ig_layer")
            found += [judged(part, method, size, chosen, scores) for size, chosen in top_circuits(scores, cfg.sizes)]
    return found


def stability(found: list[Found], reruns: list[Found]) -> dict[str, Any]:
    """Overlap of mask circuits from neighbouring lambdas, of each mask circuit with the ig circuit of the
    nearest size, and of the mask circuits of two seeds at one lambda (each measured on its own split)."""
    trained = [f for f in found if f.method == "mask"]
    out: dict[str, Any] = {
        "mask_neighbouring_lambdas": [
            {"lambdas": [a.param, b.param], "jaccard": round(jaccard(a.circuit, b.circuit), 4)}
            for a, b in zip(trained, trained[1:])
        ]
    }
    ranked = [f for f in found if f.method == "ig"]
    if ranked:
        out["mask_vs_ig"] = [
            {
                "lambda": m.param,
                "ig_size": (near := min(ranked, key=lambda f: abs(f.score.size - m.score.size))).score.size,
                "jaccard": round(jaccard(m.circuit, near.circuit), 4),
            }
            for m in trained
        ]
    if reruns:
        out["mask_seeds"] = [
            {
                "lambda": a.param,
                "seeds": [a.seed, b.seed],
                "sizes": [a.score.size, b.score.size],
                "faithfulness": [round(a.score.faithfulness, 4), round(b.score.faithfulness, 4)],
                "jaccard": round(jaccard(a.circuit, b.circuit), 4),
            }
            for a, b in combinations(trained + reruns, 2)
            if a.param == b.param
        ]
    return out
