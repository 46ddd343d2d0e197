"""SAE against transcoder against skip transcoder at one layer of SmolLM2, beside sparsify's transcoders
(issue 31, benchmark a).

    python -m benchmarks.transcoders                              # 100k tokens of the built-in corpus, layer 12
    python -m benchmarks.transcoders --max-tokens 5000 --kl-tokens 256 --scratch /tmp/tc-tiny   # a machinery check
    python -m benchmarks.transcoders --only "sae-pipe transcoder,sae-pipe skip transcoder"     # ours again, alone

One cache of the built-in corpus with the residual stream and the MLP's input and output at --layer (reused when
it exists: extract finds it by its key; 100k tokens take about 10 min on one core). From it, at equal latents,
k and training tokens (the training split --epochs times, in whole batches of 4,096):

- ours: a TopK SAE of the residual stream, a TopK transcoder and a skip transcoder (``sae-pipe fit --arch topk
  | transcoder [--skip]``, --optimizer and --lr passed on, the fit defaults otherwise), in this process;
- sparsify 1.3.3: its transcoder and skip transcoder (benchmarks/peers/peer_transcoder_train.py, a replay of its
  Trainer with TrainConfig defaults in .bench-venv, each in its own process) on the same cached MLP rows,
  then read back with ``sae-pipe import`` for KL / CE.

Per contender, over every held-out row: FVU of what it reconstructs (the residual stream for the SAE, the MLP's
output for the transcoders, in the cache's scaled units: FVU does not depend on the scale), dead share (latents
firing on no held-out row) and L0; with it spliced into the model over --kl-tokens held-out tokens (default:
all of them; ``sae-pipe evaluate --metrics kl,ce``): KL per token, CE recovered and the baseline KL they are
measured against (the SAE: the layer's input zeroed; a transcoder: the MLP's output zeroed). Tokens/s: median
over training steps (ours: log.csv; sparsify: its timed steps). ``--only`` names the contenders to train and
score (comma-separated, as in benchmarks.archs); the others are left out of the table, so rerunning ours does not
retrain sparsify's. Writes SCRATCH/transcoders.md and .csv; --write also adds the table to
benchmarks/RESULTS.md. Never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import csv
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.child import run_child
from benchmarks.peer_quality import heldout_quality
from benchmarks.report import publish
from pipeline.cache.reader import ActivationCache
from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.files import Folder
from pipeline.interop.importing import import_checkpoint
from pipeline.live.subject import encode_rows
from pipeline.sae.folder import load_sae

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4096  # tokens per step, ours and sparsify's
OURS = (
    ("sae-pipe topk SAE", "topk", False),
    ("sae-pipe transcoder", "transcoder", False),
    ("sae-pipe skip transcoder", "transcoder", True),
)
PEERS = (("sparsify transcoder", False), ("sparsify skip transcoder", True))
NAMES = [name for name, *_ in (*OURS, *PEERS)]


def ours(cache: str, tokens: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The contenders of ours --only keeps, one fit each (a sweep cannot mix the skip setting with the SAE)."""
    results = []
    for name, arch, skip in (c for c in OURS if c[0] in args.only):
        cfg = FitConfig(
            cache=cache, arch=arch, skip=skip, layer=args.layer, latents=args.latents, k=args.k,
            max_tokens=tokens, epochs=args.epochs, out=str(Path(args.scratch) / "runs"), device=args.device,
            optimizer=args.optimizer, lr=args.lr, seed=args.seed,
        )  # fmt: skip
        (run,) = fit.run(cfg).runs
        results.append({"contender": name, "run": run.url, "tokens_per_s": tokens_per_s(run)})
    return results


def tokens_per_s(run: Folder) -> float:
    """Median training throughput over the run's log rows."""
    with open(run.local() / "log.csv", encoding="utf-8") as f:
        rates = sorted(float(row["tokens_per_s"]) for row in csv.DictReader(f) if row.get("tokens_per_s"))
    return rates[len(rates) // 2] if rates else float("nan")


def scored(run: str, store: ActivationCache) -> dict[str, Any]:
    """FVU, dead share and L0 of one of our runs over every held-out row of the cache."""
    sae, cfg = load_sae(run)
    sae.eval()
    with torch.no_grad():
        outs = list(encode_rows(sae, store, cfg["sae"]["layers"], "heldout"))
    x, x_hat = (torch.cat([getattr(o, f) for o in outs]).numpy() for f in ("x", "x_hat"))
    acts, indices = (torch.cat([getattr(o.latents, f) for o in outs]).numpy() for f in ("acts", "indices"))
    return heldout_quality(x, x_hat, acts, indices, cfg["sae"]["n_latents"])


def site_rows(store: ActivationCache, split: str, layer: int, site: str) -> np.ndarray:
    """Every ``split`` row of ``site`` at ``layer`` as the cache stores it, float32 (R, D)."""
    return np.concatenate([r[:, 0] for _, r in store.split_rows(split, [layer], site=site)]).astype(np.float32)


def write_rows(store: ActivationCache, layer: int, rows: Path) -> np.ndarray:
    """The MLP sites' rows for sparsify: training rows shuffled alike, every held-out row; the held-out output."""
    rows.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).permutation(store.rows("train"))
    for site, tag in (("mlp_in", "in"), ("mlp_out", "out")):
        np.save(rows / f"train_{tag}.npy", site_rows(store, "train", layer, site)[order])
        np.save(rows / f"held_{tag}.npy", site_rows(store, "heldout", layer, site))
    return np.load(rows / "held_out.npy")


def peers(store: ActivationCache, tokens: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """sparsify's transcoders --only keeps, on the same rows, each in its own process, imported back as sae-pipe
    runs (none: the rows are not written)."""
    chosen = [(name, skip) for name, skip in PEERS if name in args.only]
    if not chosen:
        return []
    scratch = Path(args.scratch)
    target = write_rows(store, args.layer, scratch / "rows")
    scales = ",".join(str(store.site_normalizer(site).scales[args.layer]) for site in ("mlp_in", "mlp_out"))
    results = []
    for name, skip in chosen:
        tag = name.replace(" ", "-")
        cmd = [args.peer_python, "benchmarks/peers/peer_transcoder_train.py", "--rows", str(scratch / "rows")]
        cmd += ["--steps", str(tokens // BATCH), "--batch-size", str(BATCH), "--layer", str(args.layer)]
        cmd += ["--num-latents", str(args.latents), "--k", str(args.k), "--scales", scales, "--seed", str(args.seed)]
        cmd += ["--codes", str(scratch / f"{tag}.npz"), "--out", str(scratch / "peers" / tag)]
        print(f"transcoders: training {name}", file=sys.stderr, flush=True)
        result = run_child([*cmd, *(["--skip"] if skip else [])], ROOT)
        codes = np.load(scratch / f"{tag}.npz")
        quality = heldout_quality(target, codes["x_hat"], codes["acts"], codes["indices"], args.latents)
        source = str(Path(result["folder"]) / f"layers.{args.layer}.mlp")
        out = scratch / "imported" / tag
        shutil.rmtree(out, ignore_errors=True)  # a rerun's import replaces the last one's
        run = import_checkpoint(source, model="smollm2-135m", out=str(out), cache_root=str(scratch / "cache"))
        results.append({"contender": name, "run": run.url, "tokens_per_s": result["tokens_per_s_median"], **quality})
    return results


def spliced(runs: list[str], cache: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per run: KL per token, its zero-ablation baseline and CE recovered over --kl-tokens held-out tokens, in one
    evaluate call (runs at one layer and sites share the clean and ablated forwards)."""
    if args.kl_tokens < 0:
        return [{} for _ in runs]
    out = str(Path(args.scratch) / "evaluate")
    config = EvaluateConfig(runs=runs, metrics=["kl", "ce"], max_tokens=args.kl_tokens, cache=cache, out=out)
    keys = ("kl_per_token", "kl_zero_per_token", "ce_recovered")
    return [{key: metrics[key] for key in keys} for metrics in evaluate.run(config).metrics]


COLUMNS = "contender reconstructs tokens fvu dead_share l0 kl_per_token kl_zero_per_token ce_recovered tokens_per_s run"


def cell(key: str, value: Any) -> str:
    if isinstance(value, float):
        formats = {"dead_share": "{:.2%}", "tokens_per_s": "{:,.0f}", "l0": "{:.1f}"}
        return formats.get(key, "{:.4f}").format(value)
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_tables(results: list[dict[str, Any]], scratch: Path) -> list[str]:
    """The markdown table (also SCRATCH/transcoders.md) and SCRATCH/transcoders.csv; the markdown lines."""
    with open(scratch / "transcoders.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS.split(), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    columns = COLUMNS.split()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r.get(c, "")) for c in columns) + " |" for r in results]
    (scratch / "transcoders.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--max-tokens", "--extract-tokens", type=int, default=100_000, help="tokens to extract")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training split, every contender")
    parser.add_argument("--kl-tokens", type=int, default=0, help="held-out tokens of KL / CE (0: all; -1: skip)")
    parser.add_argument("--scratch", default="/tmp/sae-pipe-transcoders", help="cache, runs, rows, tables")
    parser.add_argument("--peer-python", default=str(ROOT / ".bench-venv" / "bin" / "python"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--optimizer", default="adam", help="ours: fit --optimizer (adam | signum | muon | signum-sf)")
    parser.add_argument("--lr", type=float, default=0.0, help="ours: fit --lr (0: the optimizer's automatic one)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (ours: fit --seed; sparsify: init and order)")
    parser.add_argument("--write", action="store_true", help="add the table to benchmarks/RESULTS.md")
    parser.add_argument("--only", type=lambda s: s.split(","), default=NAMES, help="contender names, comma-separated")
    args = parser.parse_args()
    if unknown := sorted(set(args.only) - set(NAMES)):
        parser.error(f"--only: no contender named {', '.join(unknown)}; the names are: {', '.join(NAMES)}.")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = ExtractConfig(
        layers=str(args.layer), sites="resid,mlp_in,mlp_out", max_tokens=args.max_tokens,
        cache_root=str(Path(args.scratch) / "cache"),
    )  # fmt: skip
    cache = extract.run(spec).folder.url
    store = ActivationCache.open(cache)
    tokens = args.epochs * store.rows("train") // BATCH * BATCH
    results = [{**r, **scored(r["run"], store)} for r in ours(cache, tokens, args)] + peers(store, tokens, args)
    for r, metrics in zip(results, spliced([r["run"] for r in results], cache, args)):
        r |= {"tokens": tokens, "reconstructs": "residual" if "SAE" in r["contender"] else "MLP output", **metrics}
    lines = write_tables(results, Path(args.scratch))
    publish(
        lines, "SAE, transcoder and skip transcoder at one layer, beside sparsify", "benchmarks.transcoders", args.write
    )


if __name__ == "__main__":
    main()
