"""SAE against transcoder against skip transcoder at one layer of SmolLM2 (issue 31, benchmark a).

    python -m benchmarks.transcoders                          # 100k tokens of the built-in corpus, layer 12
    python -m benchmarks.transcoders --extract-tokens 400000 --epochs 2 --write

One cache with the residual stream and the MLP's input and output at --layer; from it a TopK SAE (of the
residual stream), a TopK transcoder and a skip transcoder, at equal latents, k and training tokens, trained
as one sweep from one read. Per run, over all held-out rows: FVU of what it reconstructs (the residual stream
for the SAE, the MLP's output for the transcoders), dead share; with each spliced into the model over
--kl-tokens held-out tokens: KL per token, CE recovered and the baseline they are measured against (the SAE:
the layer's input zeroed; a transcoder: the MLP's output zeroed). Training tokens/s from each run's log.
Sparsify's transcoder on the same rows is not run here yet. Never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import csv
from typing import Any

from benchmarks.report import publish
from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.files import Folder


def runs(cache: str, args: argparse.Namespace) -> list[Folder]:
    """The three contenders, one fit each (a sweep cannot mix the skip setting with the SAE)."""
    common = {"cache": cache, "layer": args.layer, "latents": args.latents, "k": args.k, "epochs": args.epochs}
    out = {"out": args.out, "device": args.device}
    folders = []
    for arch, skip in (("topk", False), ("transcoder", False), ("transcoder", True)):
        folders += fit.run(FitConfig(arch=arch, skip=skip, **common, **out)).runs  # type: ignore[arg-type]
    return folders


def tokens_per_s(run: Folder) -> float:
    """Median training throughput over the run's log rows."""
    with open(run.local() / "log.csv", encoding="utf-8") as f:
        rates = sorted(float(row["tokens_per_s"]) for row in csv.DictReader(f) if row.get("tokens_per_s"))
    return rates[len(rates) // 2] if rates else float("nan")


def measure(run: Folder, args: argparse.Namespace) -> dict[str, Any]:
    out = f"{args.out}/eval/{run.name}"
    (metrics,) = evaluate.run(
        EvaluateConfig(runs=[run.url], max_tokens=args.kl_tokens, out=out, device=args.device)
    ).metrics
    return {"run": run.name, **metrics, "tokens_per_s": tokens_per_s(run)}


def lines(results: list[dict[str, Any]]) -> list[str]:
    head = "| run | reconstructs | FVU | dead | KL/token | baseline KL | CE recovered | tok/s |"
    rows = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        what = "MLP output" if "transcoder" in r["run"] else "residual"
        rows.append(
            f"| {r['run']} | {what} | {r['fvu']:.4f} | {r['dead_share']:.2%} | {r['kl_per_token']:.4f} | "
            f"{r['kl_zero_per_token']:.3f} | {r['ce_recovered']:.4f} | {r['tokens_per_s']:,.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--extract-tokens", type=int, default=100_000)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--kl-tokens", type=int, default=4096)
    parser.add_argument("--cache-root", default="/tmp/sae-pipe-transcoders")
    parser.add_argument("--out", default="/tmp/sae-pipe-transcoders/saes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--write", action="store_true", help="add the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    spec = ExtractConfig(
        layers=str(args.layer), sites="resid,mlp_in,mlp_out", max_tokens=args.extract_tokens, cache_root=args.cache_root
    )
    cache = extract.run(spec).folder.url
    results = [measure(run, args) for run in runs(cache, args)]
    publish(lines(results), "SAE, transcoder and skip transcoder at one layer", "benchmarks.transcoders", args.write)


if __name__ == "__main__":
    main()
