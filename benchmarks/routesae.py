"""The RouteSAE paper's comparison, scaled to this machine: single-layer TopK SAEs at three layers
against RouteSAE variants over layers 7..22 of SmolLM2, at equal latents and k.

    python -m benchmarks.routesae                    # whole built-in corpus, 2M training tokens
    python -m benchmarks.routesae --tokens 400000 --write
    python -m benchmarks.routesae --cache CACHE --balance 0.01 0.05 --write   # an existing 7..22 cache

Variants: TopK at layers 7, 14, 22 (one sweep, one read); RouteSAE with the reference's start (b_dec
at zero, sae-pipe's default now), with sae-pipe's old start (b_dec at the first batch's unrouted mean)
and with the opt-in load-balancing loss. Every run is evaluated on held-out rows (NMSE, dead share,
dense latents, routing shares) and spliced into the model (KL per token, CE recovered). Explanation
scores need an API key and are not run here. Never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import publish
from pipeline.cache.reader import ActivationCache
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.stage import evaluate
from pipeline.extract.config import ExtractConfig
from pipeline.extract.stage import extract
from pipeline.fit import stage as fit_stage
from pipeline.fit.config import FitConfig
from pipeline.fit.stage import fit
from pipeline.fit.train import Member
from pipeline.sae.route import core_sae


@contextlib.contextmanager
def old_start() -> Iterator[None]:
    """sae-pipe's start before issue 14: b_dec at the first batch's unweighted mean over routed layers."""
    real = fit_stage.init_pre_bias

    def mean_start(member: Member, x: torch.Tensor) -> None:
        with torch.no_grad():
            core_sae(member.model).b_dec.copy_(x.mean(dim=1).mean(dim=0))

    fit_stage.init_pre_bias = mean_start  # type: ignore[assignment]
    try:
        yield
    finally:
        fit_stage.init_pre_bias = real


def runs(cache: str, args: argparse.Namespace, out: Path) -> dict[str, str]:
    """Train every variant; return name -> run folder."""
    base = {"cache": cache, "latents": args.latents, "k": args.k, "max_tokens": args.tokens, "out": str(out)}
    base["epochs"] = -(-args.tokens // args.rows)  # enough passes for the budget
    found: dict[str, str] = {}
    topk = fit(FitConfig(**base, sweep={"layer": [7, 14, 22]}))  # type: ignore[arg-type]
    for layer, run in zip((7, 14, 22), topk, strict=True):
        found[f"TopK L{layer}"] = run.url
    route = {**base, "arch": "route", "route_layers": "7:22"}
    found["RouteSAE, reference start (default)"] = fit(FitConfig(**route))[0].url  # type: ignore[arg-type]
    if args.old_start:
        with old_start():
            old = FitConfig(**{**route, "out": str(out / "old")})  # type: ignore[arg-type]
            found["RouteSAE, old mean start"] = fit(old)[0].url
    for weight in args.balance:
        balanced = fit(FitConfig(**route, route_balance=weight))[0]  # type: ignore[arg-type]
        found[f"RouteSAE + balance loss {weight:g}"] = balanced.url
    return found


def lines(results: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        "| SAE | NMSE | FVU | dead share | features alive (> 1e-4 of tokens) | KL / token | CE recovered "
        "| top layer share | routing shares (layer: share >= 5 %) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        shares = m.get("routing_shares", {})
        big = ", ".join(f"{layer}: {s:.0%}" for layer, s in shares.items() if s >= 0.05) or "-"
        top = f"{m['top_route_share']:.0%}" if "top_route_share" in m else "-"
        rows.append(
            f"| {name} | {m['nmse']:.4f} | {m['fvu']:.4f} | {m['dead_share']:.2%} | {m['live_latents']} "
            f"| {m['kl_per_token']:.4f} | {m['ce_recovered']:.3f} | {top} | {big} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per SAE")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--balance", type=float, nargs="+", default=[0.05], help="weights of the balance-loss variants")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--extract-tokens", type=int, default=0, help="cache size (0 = the whole built-in corpus)")
    parser.add_argument("--cache-root", default="cache")
    parser.add_argument("--cache", default="", help="an existing cache of layers 7..22 (default: extract one)")
    parser.add_argument("--no-old-start", dest="old_start", action="store_false", help="skip the old-start variant")
    parser.add_argument("--write", action="store_true", help="add the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = ExtractConfig(layers="7:22", max_tokens=args.extract_tokens, shard_mb=256, cache_root=args.cache_root)
    cache = ActivationCache.open(args.cache).folder if args.cache else extract(spec)
    args.rows = int(cache.read_json("manifest.json")["rows"]["train"])
    with tempfile.TemporaryDirectory() as scratch:
        found = runs(cache.url, args, Path(scratch))
        results = {}
        for name, run in found.items():
            (m,) = evaluate(EvaluateConfig(runs=[run], max_tokens=args.eval_tokens, out=scratch))
            (fast,) = evaluate(EvaluateConfig(runs=[run], metrics=["nmse"], max_tokens=0, out=scratch))
            keep = ("nmse", "fvu", "dead_share", "live_latents", "routing_shares", "top_route_share")
            results[name] = {**m, **{k: fast[k] for k in keep if k in fast}}
    table = lines(results)
    publish(table, "RouteSAE against single-layer TopK", "benchmarks.routesae", args.write)


if __name__ == "__main__":
    main()
