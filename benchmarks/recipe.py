"""The default training recipe, measured: learning rate x dead-latent revival x AuxK settings x dictionary
size on the demo cache (SmolLM2 layer 12), each setting evaluated over every held-out row.

    python -m benchmarks.recipe                                  # the grid below, 2 epochs, 2 data seeds
    python -m benchmarks.recipe --latents 4096 --lr 6e-3 --revive 0 --write   # the demo's recipe
    python -m benchmarks.recipe --latents 16384 --lr 0 --revive 0 --k-aux 0,128 --aux-alpha 0.03125,0.3

Each dictionary size is one `sae-pipe fit` sweep (every lr x revive x k_aux x aux_alpha x dead member from
one read), then
`sae-pipe evaluate --metrics nmse,train_dead --max-tokens 0`. lr 0 is the automatic default. Besides the
held-out dead share, each run reports the share of latents silent on every training row: a latent that fires
on a few hundred of the 0.4M training tokens (rate ~1e-4) is often silent on the 21k held-out ones,
which at 16384 latents is most of what the held-out number counts. With ``--write`` the table is
added to benchmarks/RESULTS.md. Never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import publish
from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.params import build_config, load_params

ROOT = Path(__file__).resolve().parents[1]
SWEPT = ("lr", "revive", "k_aux", "aux_alpha", "dead_tokens")  # FitConfig fields, each a list option here


def run_grid(cache: str, latents: int, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """One sweep per data seed (every combination of the swept settings), each member evaluated on all
    held-out rows."""
    rows = []
    for data_seed in args.data_seeds:
        cfg = FitConfig(
            cache=cache,
            layer=12,
            latents=latents,
            k=args.k,
            epochs=args.epochs,
            data_seed=data_seed,
            out=str(out),
            sweep={name: getattr(args, name) for name in SWEPT},
        )
        runs = fit.run(cfg).runs
        metrics = ["nmse", "train_dead"]
        results = evaluate.run(
            EvaluateConfig(runs=[r.url for r in runs], metrics=metrics, max_tokens=0, out=str(out))
        ).metrics
        for run, result in zip(runs, results, strict=True):
            record = run.read_json("cfg.json")
            training, tokens = record["training"], record["steps"] * record["training"]["batch_size"]
            rows.append({"latents": latents, "tokens": tokens, "data_seed": data_seed, **training, **result})
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: one line per (latents, settings as resolved), mean over data seeds with the spread."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["latents"], row["tokens"], *(row[name] for name in SWEPT)), []).append(row)
    lines = [
        "| latents | training tokens | lr | revive | k_aux | aux_alpha | dead after (tokens) | FVU "
        "| dead share (held-out) | silent on all training rows | latents on > 10 % of tokens | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (latents, tokens, lr, revive, k_aux, alpha, dead), group in sorted(groups.items()):
        fvu = [g["fvu"] for g in group]
        dead_share = [g["dead_share"] for g in group]
        dense = [g["dense_latents"] for g in group]
        silent = [g["train_dead_share"] for g in group]
        lines.append(
            f"| {latents} | {tokens:,} | {lr:.2g} | {revive:g} | {k_aux} | {alpha:.3g} | {dead:,} "
            f"| {_spread(fvu, '.4f')} | {_spread(dead_share, '.2%')} | {_spread(silent, '.2%')} "
            f"| {_spread(dense, '.0f')} | {len(group)} |"
        )
    return lines


def _spread(values: list[float], fmt: str) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=lambda s: [int(v) for v in s.split(",")], default=[1024, 4096, 16384])
    parser.add_argument("--lr", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 2e-3, 8e-3])
    parser.add_argument("--revive", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 0.05])
    parser.add_argument("--k-aux", type=lambda s: [int(v) for v in s.split(",")], default=[0], help="0 = auto")
    parser.add_argument("--aux-alpha", type=lambda s: [float(v) for v in s.split(",")], default=[1 / 32])
    parser.add_argument(
        "--dead",
        dest="dead_tokens",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[0],
        help="dead-latent thresholds in tokens (0 = auto)",
    )
    parser.add_argument("--data-seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cache-root", default="cache")
    parser.add_argument("--write", action="store_true", help="add the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    params = load_params(ROOT / "params.yaml")
    demo = build_config(ExtractConfig, params, "extract", {"cache_root": args.cache_root}, shared=("model", "data"))
    cache = extract.run(demo).folder.url
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for latents in args.latents:
            rows += run_grid(cache, latents, args, Path(scratch) / f"n{latents}")
    lines = table(rows)
    publish(lines, "default training recipe", "benchmarks.recipe", args.write)


if __name__ == "__main__":
    main()
