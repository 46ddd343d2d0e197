"""`sae-pipe circuit`: SAEs at a few layers + the LLM + a task -> circuits of many sizes, measured on held-out pairs.

Outputs under <cache-root>/circuits/<task>-<hash>/ (see :mod:`pipeline.circuit.outputs`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from itertools import combinations
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline.circuit.config import ABLATIONS, METHODS, CircuitConfig
from pipeline.circuit.measures import Baseline, baseline, jaccard, measure
from pipeline.circuit.methods import Lens, attributions, top_circuits, train_mask
from pipeline.circuit.outputs import Found, write_outputs
from pipeline.circuit.spliced import Batch, Site, ablation_values, batches
from pipeline.circuit.tasks import Pair, load_task, split
from pipeline.infra.console import Stopwatch, say
from pipeline.infra.device import resolve_device
from pipeline.infra.errors import UserError
from pipeline.infra.files import Folder
from pipeline.infra.receipts import file_digest
from pipeline.llm.model import load_tokenizer, resolve_model
from pipeline.sae.subject import Subject, load_llm, load_subject
from pipeline.sae.topk import TopKSAE

SOLVED = 0.5  # a task the model gets right on fewer test pairs than this is reported as unsolved


def check(cfg: CircuitConfig) -> None:
    unknown = sorted(set(cfg.method) - set(METHODS))
    if unknown or not cfg.method:
        raise UserError(f"unknown --method {','.join(unknown) or '(none)'}; use some of {','.join(METHODS)}.")
    if cfg.ablation not in ABLATIONS:
        raise UserError(f"unknown --ablation {cfg.ablation!r}; use one of {', '.join(ABLATIONS)}.")
    if "mask" in cfg.method and (not cfg.lambdas or min(cfg.lambdas) < 0):
        raise UserError(f"--lambdas {cfg.lambdas} must be one or more non-negative numbers for the mask method.")
    if min(cfg.steps, cfg.ig_steps, cfg.batch_size, cfg.pairs, *cfg.sizes) < 1:
        raise UserError("--steps, --ig-steps, --batch-size, --pairs and --sizes must be at least 1.")
    if not 0 < cfg.test_share < 1:
        raise UserError(f"--test-share {cfg.test_share} must be between 0 and 1.")
    if cfg.seeds and "mask" not in cfg.method:
        raise UserError(f"--seeds {cfg.seeds} re-runs the mask method; add mask to --method or leave --seeds out.")


def open_sites(runs: list[str], layers: list[int], device: torch.device) -> list[Subject]:
    """The runs to splice, one TopK run per layer, all from caches of one model."""
    if not runs:
        raise UserError("no run given: pass one TopK run folder per layer, e.g. `sae-pipe circuit RUN_L6 RUN_L12`.")
    subjects = [load_subject(run, device) for run in runs]
    for s in subjects:
        if not isinstance(s.sae, TopKSAE) or s.cfg["sae"]["arch"] != "topk":
            raise UserError(
                f"run {s.folder.name} is a {s.cfg['sae']['arch']} SAE; circuits are found over TopK runs "
                "(one per layer); train them with `sae-pipe fit --sweep layer=...`."
            )
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
    settings["saes"] = [file_digest(s.folder.local() / "sae.safetensors") for s in subjects]
    task = Path(cfg.task)
    if task.is_file():
        settings["task_file"] = file_digest(task)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Folder.at(cfg.cache_root).child("circuits", f"{task.stem}-{digest}")


class Split(NamedTuple):
    """One seed's train/test split of the pairs, with the model's ends measured on its test pairs."""

    seed: int
    train: list[Batch]
    test: list[Batch]
    lens: Lens  # its ablation values are the means over this split's train patch prompts
    base: Baseline


def prepare(cfg: CircuitConfig, pairs: list[Pair], seed: int, spliced: Lens, special: set[int]) -> Split:
    """The split of ``pairs`` drawn by ``seed``, batched, with its ablation values and baseline."""
    train_pairs, test_pairs = split(pairs, cfg.test_share, seed)
    device = spliced.sites[0].sae.W_dec.device
    train = batches(train_pairs, cfg.batch_size, special, device)
    test = batches(test_pairs, cfg.batch_size, special, device)
    means = ablation_values(spliced.model, spliced.blocks, spliced.sites, train, cfg.ablation)
    lens = spliced._replace(ablate=means)
    return Split(seed, train, test, lens, baseline(lens, test))


def circuit(cfg: CircuitConfig) -> Folder:
    """Find circuits with every method of ``cfg``, measure them on the test split, write the outputs."""
    check(cfg)
    clock = Stopwatch()
    device = resolve_device(cfg.device)
    subjects = open_sites(cfg.runs, cfg.layers, device)
    spec = subjects[0].cache.manifest["spec"]["model"]
    tokenizer = load_tokenizer(resolve_model(spec["name"], spec.get("revision")))
    pairs = load_task(cfg.task, tokenizer, cfg.pairs, cfg.seed)
    model, blocks = load_llm(subjects[0].cache, device)
    model.requires_grad_(False)  # only the masks learn; no gradient buffers for the model's weights
    special = set(tokenizer.all_special_ids)
    sites = [Site(s.layers[0], s.sae.requires_grad_(False), s.normalizer, s.folder.name) for s in subjects]  # type: ignore[arg-type]
    spliced = Lens(model, blocks, sites, [])  # the ablation values come with each split
    main = prepare(cfg, pairs, cfg.seed, spliced, special)
    base = main.base
    n_test = sum(len(b.clean) for b in main.test)
    say(
        f"circuit: task {cfg.task}: {len(pairs) - n_test} train / {n_test} test pairs; clean logit difference "
        f"{base.full:.3f} (positive on {base.solved:.0%}), all latents ablated {base.empty:.3f}"
    )
    if base.solved < SOLVED:
        say(
            f"circuit: the model does not solve task {cfg.task} (clean answer ahead on {base.solved:.0%} of test pairs)"
        )
    found = find(cfg, main)
    reruns = [  # the mask again on each further seed's split, for the overlap across seeds
        f
        for seed in dict.fromkeys(cfg.seeds)
        if seed != cfg.seed
        for f in masks(cfg, prepare(cfg, pairs, seed, spliced, special))
    ]
    facts: dict[str, Any] = {
        "task": cfg.task,
        "pairs": {"train": len(pairs) - n_test, "test": n_test},
        "baseline": base._asdict(),
        "solved": base.solved >= SOLVED,
        "stability": stability(found, reruns),
        "seconds": round(clock.seconds, 1),
        "config": asdict(cfg),
    }
    out = out_folder(cfg, subjects)
    write_outputs(out, subjects, found, reruns, facts, cfg.cache_root)
    return out


def masks(cfg: CircuitConfig, part: Split) -> list[Found]:
    """The mask method's circuits, one per lambda, trained on ``part``'s train pairs and measured on its test."""
    found = []
    for lam in sorted(cfg.lambdas):
        logits = train_mask(part.lens, part.train, lam, cfg.steps, cfg.lr, cfg.t_max, part.seed)
        chosen = [m > 0 for m in logits]
        found.append(Found("mask", lam, part.seed, chosen, logits, measure(part.lens, part.test, part.base, chosen)))
    return found


def find(cfg: CircuitConfig, part: Split) -> list[Found]:
    """Every method's circuits on one split, measured on its test batches."""
    found = masks(cfg, part) if "mask" in cfg.method else []
    for method, steps in (("ig", cfg.ig_steps), ("ig_layer", cfg.ig_steps), ("attrib", 1)):
        if method in cfg.method:
            scores = attributions(part.lens, part.train, steps, per_site=method == "ig_layer")
            for size, chosen in top_circuits(scores, cfg.sizes):
                score = measure(part.lens, part.test, part.base, chosen)
                found.append(Found(method, size, part.seed, chosen, scores, score))
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
