"""The RouteSAE paper's comparison, scaled to this machine: single-layer TopK SAEs against RouteSAEs over
layers 7..22 of SmolLM2, at equal latents, k and training tokens.

    python -m benchmarks.routesae                    # whole built-in corpus, 2M training tokens per SAE
    python -m benchmarks.routesae --cache CACHE      # issue 29: a cache of layers 7..22, two seeds each
    python -m benchmarks.routesae --extract-tokens 120000 --tokens 400000 --write
    python -m benchmarks.routesae --cache CACHE --router-lr 5e-4 1e-3 --seeds 0 1 --topk-layers 14

Variants, each a sweep from one read of the cache, every one at each of --seeds (0 1): TopK at --topk-layers
(7, 14, 22); RouteSAE at sae-pipe's recipe, one member per router rate (--router-lr, 0 = the default,
pipeline.sae.archs.route.ROUTER_LR); RouteSAE with the centred router input (`--router-centre`, not in the
paper; --no-centre drops it); RouteSAE with `--recipe reference` (the paper's training); optionally
the opt-in load-balancing loss (--balance). Per run: the top layer's share of the training batches over
training (from log.csv), and over all held-out rows NMSE, FVU, dead share, live features, the top layer's
share and how many routed layers get under 5 % of the rows; KL per token and CE recovered with the SAE
spliced in over --kl-tokens held-out tokens (0 = skip); with --suites (on by default) a second table
of the evaluate suites absorption (--probe-words per letter) and probing, the offline stand-in for the
paper's interpretability claim. Every number, with each layer's held-out share, also goes to
<--out>/routesae.json. Run folders stay in --out, so a second call with the same settings
only evaluates. Explanation scores need an API key and are not run here. Never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import publish
from pipeline.cache.reader import ActivationCache
from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig

POINTS = (0.1, 0.25, 0.5, 1.0)  # shares of training at which the routing is reported
MINOR = 0.05  # a routed layer getting less than this share of the held-out rows counts as left out


def runs(cache: str, args: argparse.Namespace) -> list[str]:
    """Train (or find) every variant; return the run folders."""
    base = {"cache": cache, "latents": args.latents, "k": args.k, "max_tokens": args.tokens, "out": args.out}
    base["epochs"] = -(-args.tokens // args.rows)  # enough passes for the budget
    route = {**base, "arch": "route", "route_layers": "7:22"}
    configs = [
        FitConfig(**base, sweep={"layer": args.topk_layers, "seed": args.seeds}),  # type: ignore[arg-type]
        FitConfig(**route, sweep={"router_lr": args.router_lr, "seed": args.seeds}),  # type: ignore[arg-type]
        *centred(route, args),
        FitConfig(**route, recipe="reference", sweep={"seed": args.seeds}),  # type: ignore[arg-type]
        *(FitConfig(**route, route_balance=w, sweep={"seed": args.seeds}) for w in args.balance),  # type: ignore[arg-type]
    ]
    return [folder.url for cfg in configs for folder in fit.run(cfg).runs]


def centred(route: dict[str, Any], args: argparse.Namespace) -> list[FitConfig]:
    """The centred-router variant (issue 29: the router reads the summed layers minus their running mean),
    at the default rates, one member per seed; none with --no-centre."""
    return [FitConfig(**route, router_centre=True, sweep={"seed": args.seeds})] if args.centre else []  # type: ignore[arg-type]


def label(cfg: dict[str, Any]) -> str:
    """A run's row name from its cfg.json."""
    sae, training = cfg["sae"], cfg["training"]
    if sae["arch"] != "route":
        return f"TopK L{sae['layers'][0]}, seed {training['seed']}"
    if training.get("recipe") == "reference":
        name = "RouteSAE, reference recipe"
    elif training.get("route_balance"):
        name = f"RouteSAE + balance loss {training['route_balance']:g}"
    else:
        name = f"RouteSAE, router lr {training['router_lr']:.2g} (SAE lr {training['lr']:.2g})"
        name += ", `--router-centre`" if sae.get("router_centre") else ""
    return f"{name}, seed {training['seed']}"


def over_training(run: Path) -> tuple[list[float], list[float]]:
    """At each of POINTS, means over the logged steps of the tenth of training that ends there: the top
    layer's share of the training batches (per layer, then the largest), and the dead share (idle for
    dead_tokens tokens: when latents die tells a bad start from a slow loss)."""
    with open(run / "log.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    layers = [key for key in rows[0] if key.startswith("share_L")]
    last = int(rows[-1]["step"])
    tops, dead = [], []
    for point in POINTS:
        window = [r for r in rows if point - 0.1 < int(r["step"]) / last <= point] or rows[:1]
        tops.append(max(sum(float(r[layer]) for r in window) / len(window) for layer in layers))
        dead.append(sum(float(r["dead_share"]) for r in window) / len(window))
    return tops, dead


def measure(run: str, args: argparse.Namespace) -> dict[str, Any]:
    """Held-out metrics of one run (NMSE and routing over all held-out rows; KL / CE over kl_tokens), and the
    share of latents silent on every training row (dead, not just rare on the few held-out rows)."""
    scored = EvaluateConfig(runs=[run], metrics=["nmse", "train_dead"], max_tokens=0, out=args.out + "/evaluate")
    (m,) = evaluate.run(scored).metrics
    if args.kl_tokens:
        spliced = EvaluateConfig(runs=[run], max_tokens=args.kl_tokens, out=args.out + "/evaluate-kl")
        (kl,) = evaluate.run(spliced).metrics
        m = {**m, "kl_per_token": kl["kl_per_token"], "ce_recovered": kl["ce_recovered"]}
    folder = Path(run)
    cfg = json.loads((folder / "cfg.json").read_text())
    m["name"], m["tokens"] = label(cfg), cfg["steps"] * cfg["training"]["batch_size"]
    if cfg["sae"]["arch"] == "route":
        m["train_top"], m["train_dead"] = over_training(folder)
    return m


SUITE_FILES = {"absorption": "absorption_first_letter", "probing": "sparse_probing"}


def suite_numbers(run: str, args: argparse.Namespace) -> dict[str, Any]:
    """The absorption and probing suites of one run (`sae-pipe evaluate --suite absorption,probing`), read back
    from their SAEBench files: a RouteSAE's letter probes sit on the layer its router sends most words to."""
    out = args.out + "/evaluate-suites"
    suites = {"suite": list(SUITE_FILES), "probe_words": args.probe_words, "probe_tokens": args.probe_tokens}
    cfg = EvaluateConfig(runs=[run], metrics=["nmse"], out=out, **suites)
    evaluate.run(cfg)
    name = Path(run).name
    docs = {
        suite: json.loads(Path(out, name, "saebench", kind, f"sae-pipe_{name}_eval_results.json").read_text())
        for suite, kind in SUITE_FILES.items()
    }
    absorption, probing = docs["absorption"], docs["probing"]
    notes = absorption["eval_result_unstructured"]
    found = {"absorption": absorption["eval_result_metrics"]["mean"], "probing": probing["eval_result_metrics"]}
    found["probe_layer"], found["letters"] = notes["probe_layer"], notes["letters_evaluated"]
    found["probe_f1"] = sum(notes["probe_f1"].values()) / len(notes["probe_f1"])
    return found


def suite_lines(results: list[dict[str, Any]]) -> list[str]:
    """The suites' table: absorption (SAEBench's mean absorption fraction and full-absorption rate over the
    letters whose probe reaches F1 0.6; split latents per letter) and k-sparse probing accuracies."""
    rows = [
        "| SAE | letter probes' layer | letters evaluated | mean probe F1 | absorption fraction | full absorption "
        "| split latents | probing: SAE top-1 | SAE top-5 | SAE all latents | activations (dense) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        a, sae, llm = m["absorption"], m["probing"]["sae"], m["probing"]["llm"]
        rows.append(
            f"| {m['name']} | L{m['probe_layer']} | {m['letters']} | {m['probe_f1']:.3f} "
            f"| {a['mean_absorption_fraction_score']:.4f} | {a['mean_full_absorption_score']:.4f} "
            f"| {a['mean_num_split_features']:.2f} | {sae['sae_top_1_test_accuracy']:.3f} "
            f"| {sae['sae_top_5_test_accuracy']:.3f} | {sae['sae_test_accuracy']:.3f} "
            f"| {llm['llm_test_accuracy']:.3f} |"
        )
    return rows


def lines(results: list[dict[str, Any]]) -> list[str]:
    points = " / ".join(f"{p:.0%}" for p in POINTS)
    rows = [
        f"| SAE | tokens | top layer share, training batches at {points} | top layer share, held-out | "
        f"layers under {MINOR:.0%}, held-out | NMSE | FVU | dead share | silent on every training row | "
        f"dead share, training batches at {points} | features alive (> 1e-4 of tokens) | KL / token | CE recovered |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        train = " / ".join(f"{s:.0%}" for s in m["train_top"]) if "train_top" in m else "-"
        dying = " / ".join(f"{s:.1%}" for s in m["train_dead"]) if "train_dead" in m else "-"
        shares = m.get("routing_shares", {})
        top = f"{m['top_route_share']:.0%} (L{max(shares, key=shares.get)})" if shares else "-"
        minor = f"{sum(s < MINOR for s in shares.values())} of {len(shares)}" if shares else "-"
        kl = f"{m['kl_per_token']:.4f} | {m['ce_recovered']:.3f}" if "kl_per_token" in m else "- | -"
        rows.append(
            f"| {m['name']} | {m['tokens']:,} | {train} | {top} | {minor} | {m['nmse']:.4f} | {m['fvu']:.4f} "
            f"| {m['dead_share']:.2%} | {m['train_dead_share']:.2%} | {dying} | {m['live_latents']} | {kl} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per SAE")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--router-lr", type=float, nargs="+", default=[0.0], help="router rates (0 = the default)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--topk-layers", type=int, nargs="+", default=[7, 14, 22])
    parser.add_argument("--centre", action=argparse.BooleanOptionalAction, default=True, help="centred router runs")
    parser.add_argument("--balance", type=float, nargs="*", default=[], help="weights of balance-loss variants")
    parser.add_argument("--kl-tokens", type=int, default=8192, help="held-out tokens for KL / CE (0 = skip)")
    parser.add_argument("--extract-tokens", type=int, default=0, help="cache size (0 = the whole built-in corpus)")
    parser.add_argument("--cache-root", default="cache")
    parser.add_argument("--cache", default="", help="an existing cache of layers 7..22 (default: extract one)")
    parser.add_argument("--out", default="cache/routesae-bench", help="run folders and their metrics")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="add the table to benchmarks/RESULTS.md")
    parser.add_argument("--suites", action=argparse.BooleanOptionalAction, default=True, help="absorption, probing")
    parser.add_argument("--probe-words", type=int, default=200, help="absorption: words per first letter")
    parser.add_argument("--probe-tokens", type=int, default=0, help="probing: cache rows pooled (0 = all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = ExtractConfig(layers="7:22", max_tokens=args.extract_tokens, cache_root=args.cache_root)
    cache = ActivationCache.open(args.cache).folder if args.cache else extract.run(spec).folder
    args.rows = int(cache.read_json("manifest.json")["rows"]["train"])
    results = [
        {**measure(run, args), **(suite_numbers(run, args) if args.suites else {})} for run in runs(cache.url, args)
    ]
    Path(args.out, "routesae.json").write_text(json.dumps(results, indent=1, default=str))
    publish(lines(results), "RouteSAE against single-layer TopK", "benchmarks.routesae", args.write)
    if args.suites:
        title = "RouteSAE against single-layer TopK: absorption and k-sparse probing (evaluate --suite)"
        publish(suite_lines(results), title, "benchmarks.routesae", args.write)


if __name__ == "__main__":
    main()
