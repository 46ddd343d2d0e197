"""Peer quality at equal tokens: sae-pipe's default fit against sparsify's and SAELens's default trainers,
each trained on the same cached rows for the demo's budget and scored the same way on every held-out row.

    python -m benchmarks.peer_quality --cache CACHE --write    # about 25 min on 2 shared cores
    python -m benchmarks.peer_quality --write                  # extracts (or finds) the demo cache first
    (--peer-python PATH: the peers' venv, default .bench-venv/bin/python; `make bench` runs the second line)

The contenders run one after another, never side by side, each in a process of its own (benchmarks.child:
that process's wall time, and its peak RSS as VmHWM, which unlike ru_maxrss leaves out the parent's memory):

- sae-pipe: ``sae-pipe fit --params params.yaml --cache CACHE`` (pipeline.fit with the demo's FitConfig:
  4096 latents, k 32, batch 4096, 2 epochs), streaming from the cache. Its token count sets the peers'.
- sparsify 1.3.3: benchmarks/peers/peer_steps.py's replay of its Trainer with TrainConfig defaults
  (SignSGD under schedule-free, lr 5e-3 / sqrt(latents / 2^14), b_dec := first batch's mean, AuxK off),
  num_latents 4096, k 32. TrainConfig's batch is 32 sequences: 8,192 tokens of this cache's 256-token
  sequences. A second row uses sae-pipe's batch of 4,096 tokens (what issue 14's reference measured).
- SAELens 6.54.12: TopKTrainingSAE with its default config (k set to 32) driven by its own SAETrainer
  (Adam 3e-4, constant schedule, batch 4,096 tokens, AuxK for latents idle 1,000 steps).

Every contender sees the cache's normalized (standardize) layer rows: sae-pipe streams them, the peers get
the same training rows as one float32 .npy, loaded before training (hence their larger RSS at the start).
All are scored by :func:`heldout_quality` from each one's held-out reconstruction and codes.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.child import own_peak_rss_mb, own_rss_mb, run_child
from benchmarks.report import publish
from benchmarks.run import training_rows
from pipeline.cache.reader import ActivationCache
from pipeline.evaluate.stage import DENSE
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.params import build_config, load_params
from pipeline.sae.folder import load_sae
from pipeline.sae.quality import Reconstruction

ROOT = Path(__file__).resolve().parents[1]
HELD_BATCH = 4096  # held-out rows per forward
OURS = "sae-pipe (params.yaml)"


def heldout_quality(
    x: np.ndarray, x_hat: np.ndarray, acts: np.ndarray, indices: np.ndarray, n_latents: int
) -> dict[str, float]:
    """FVU, dead share, dense latents and L0 of one SAE over held-out rows x (R, D).

    ``acts`` and ``indices`` (R, k) are each row's top-k code; a latent fires where its activation is > 0
    (a top-k slot holding 0 is padding). Dead: fires on no row. Dense: fires on more than 10 % of rows.
    """
    quality = Reconstruction()
    quality.add(torch.from_numpy(x).double(), torch.from_numpy(x_hat).double())
    fired = acts > 0  # (R, k)
    fires = np.bincount(indices[fired].astype(np.int64), minlength=n_latents)  # (N,) rows each latent fired on
    return {
        "fvu": quality.fvu,
        "dead_share": float((fires == 0).mean()),
        "dense_latents": int((fires > DENSE * len(x)).sum()),
        "l0": float(fired.sum()) / len(x),
    }


def sae_pipe_child(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's fit (params.yaml) on the cache, then its code for every held-out row into ``args.codes``."""
    cfg = build_config(FitConfig, load_params(ROOT / "params.yaml"), "fit", {"cache": args.cache, "out": args.runs})
    rss_before = own_rss_mb()
    start = time.perf_counter()
    (run,) = fit.run(cfg).runs
    train_s = time.perf_counter() - start
    sae, record = load_sae(run)
    held = torch.from_numpy(np.load(args.heldout))  # (R, D)
    with torch.no_grad():
        outs = [sae(held[i : i + HELD_BATCH]) for i in range(0, len(held), HELD_BATCH)]
    np.savez(
        args.codes,
        x_hat=torch.cat([o.x_hat for o in outs]).numpy(),
        acts=torch.cat([o.latents.acts for o in outs]).numpy(),
        indices=torch.cat([o.latents.indices for o in outs]).numpy(),
    )
    training = record["training"]
    return {
        "train_s": train_s,
        "rss_before_steps_mb": rss_before,
        "tokens": record["steps"] * cfg.batch_size,
        "batch_size": cfg.batch_size,
        "steps": record["steps"],
        "num_latents": record["sae"]["n_latents"],
        "k": record["sae"]["k"],
        "optimizer": f"{training['optimizer']} lr {training['lr']:.3g}, {training['schedule']}",
        "run": run.url,
        "peak_rss_mb": own_peak_rss_mb(),
    }


def peer_commands(
    python: str, train: Path, held: Path, codes: Path, tokens: int, n: int, k: int
) -> dict[str, list[str]]:
    """The peers' commands (``python``: their venv) for ``tokens`` training tokens at their batch sizes."""
    base = [python, "benchmarks/peers/peer_steps.py", "--data", str(train), "--heldout", str(held)]
    base += ["--num-latents", str(n), "--k", str(k)]
    runs = {
        "sparsify 1.3.3 (its batch: 32 seqs = 8,192 tokens)": ("sparsify", 8192),
        "sparsify 1.3.3 (batch 4,096)": ("sparsify", 4096),
        "SAELens 6.54.12 (its batch: 4,096 tokens)": ("saelens", 4096),
    }
    return {
        name: [*base, "--child", lib, "--batch-size", str(batch), "--steps", str(tokens // batch)]
        + ["--codes", str(codes / f"{i}.npz")]
        for i, (name, (lib, batch)) in enumerate(runs.items())
    }


def measure(name: str, cmd: list[str], x: np.ndarray) -> dict[str, Any]:
    """Train one contender in its own process, then score the held-out code it wrote (after ``--codes``)."""
    print(f"peer_quality: training {name}", file=sys.stderr)
    result = run_child(cmd, ROOT)
    result["load_after"] = Path("/proc/loadavg").read_text().split()[0]  # the machine may be shared
    codes = np.load(cmd[cmd.index("--codes") + 1])
    result |= heldout_quality(x, codes["x_hat"], codes["acts"], codes["indices"], result["num_latents"])
    result["tokens"] = result["batch_size"] * result["steps"]
    return result


def run_all(cache: str, scratch: Path, peer_python: str) -> dict[str, dict[str, Any]]:
    """Every contender, one at a time, each scored on all held-out rows of the cache."""
    store = ActivationCache.open(cache)
    layer = build_config(FitConfig, load_params(ROOT / "params.yaml"), "fit", {}).layer
    layer = store.layers[0] if layer is None else layer  # no layer set: the cache's only one, as fit does
    train, held = training_rows(store, layer, scratch), scratch / "held.npy"
    x = np.concatenate([rows[:, 0] for _, rows in store.heldout_rows([layer])])  # (R, D) every held-out row
    np.save(held, x)
    ours = [sys.executable, "-m", "benchmarks.peer_quality", "--child", "--cache", cache, "--heldout", str(held)]
    ours += ["--codes", str(scratch / "ours.npz"), "--runs", str(scratch / "runs")]
    first = measure(OURS, ours, x)  # its budget and size set the peers'
    peers = peer_commands(peer_python, train, held, scratch, first["tokens"], first["num_latents"], first["k"])
    return {OURS: first, **{name: measure(name, cmd, x) for name, cmd in peers.items()}}


# The table's columns: header, and the cell of a contender (its name, its result).
COLUMNS: list[tuple[str, Callable[[str, dict[str, Any]], str]]] = [
    ("contender", lambda name, r: name),
    ("optimizer", lambda name, r: r["optimizer"]),
    ("batch x steps", lambda name, r: f"{r['batch_size']:,} x {r['steps']}"),
    ("held-out FVU", lambda name, r: f"{r['fvu']:.4f}"),
    ("dead share", lambda name, r: f"{r['dead_share']:.2%}"),
    ("latents on > 10 %", lambda name, r: str(r["dense_latents"])),
    ("L0", lambda name, r: f"{r['l0']:.1f}"),
    ("train s", lambda name, r: f"{r['train_s']:,.0f}"),
    ("process s", lambda name, r: f"{r['process_wall_s']:,.0f}"),
    ("peak RSS MiB", lambda name, r: f"{r['peak_rss_mb']:,.0f}"),
    ("RSS at training start MiB", lambda name, r: f"{r['rss_before_steps_mb']:,.0f}"),
    ("load after", lambda name, r: r["load_after"]),
]


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: one row per contender."""
    rows = [[cell(name, r) for _, cell in COLUMNS] for name, r in results.items()]
    return ["| " + " | ".join(row) + " |" for row in [[h for h, _ in COLUMNS], ["---"] * len(COLUMNS), *rows]]


def header(results: dict[str, dict[str, Any]], cache: str, train_gb: float) -> list[str]:
    """What was trained on and with which peer versions (the table's setting)."""
    ours, peers = results[OURS], [r for name, r in results.items() if name != OURS]
    versions = sorted(
        {f"{r['library']} {r['version']}" for r in peers} | {f"torch {r['torch_version']}" for r in peers}
    )
    store = ActivationCache.open(cache)
    return [
        f"Cache `{store.key}` ({store.rows('train'):,} training rows, {store.rows('heldout'):,} held-out rows, "
        f"normalized rows as stored). Every contender: {ours['num_latents']} latents, k {ours['k']}, "
        f"{ours['tokens']:,} training tokens, its own trainer defaults otherwise, scored on every held-out row. "
        f"Peers ({', '.join(versions)}) in .bench-venv. Dead share: latents firing on no held-out row; "
        "train s: the training call (peers: their package import included); process s and peak RSS (VmHWM): the "
        "contender's own process, held-out scoring included; the peers hold the training rows as "
        f"one float32 array ({train_gb:.2f} GB, in 'RSS at training start'), sae-pipe streams them from the cache.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default="", help="activation cache (default: the demo's, from params.yaml)")
    parser.add_argument("--cache-root", default="cache", help="where the demo cache is found or extracted")
    parser.add_argument("--peer-python", default=str(ROOT / ".bench-venv" / "bin" / "python"), help="the peers' venv")
    parser.add_argument("--scratch", default="", help="keep the rows, runs, codes and results.json here")
    parser.add_argument("--write", action="store_true", help="add the table to benchmarks/RESULTS.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # sae-pipe's contender
    for inner in ("--heldout", "--codes", "--runs"):
        parser.add_argument(inner, default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps({"library": "sae-pipe", **sae_pipe_child(args)}), flush=True)
        return
    cache = args.cache
    if not cache:
        demo = {"cache_root": args.cache_root}
        cache = extract.run(
            build_config(ExtractConfig, load_params(ROOT / "params.yaml"), "extract", demo, ("model", "data"))
        ).folder.url
    with tempfile.TemporaryDirectory(prefix="peer-quality-") as tmp:
        scratch = Path(args.scratch or tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        results = run_all(cache, scratch, args.peer_python)
        (scratch / "results.json").write_text(json.dumps(results, indent=1))
        lines = [*header(results, cache, (scratch / "train.npy").stat().st_size / 1e9), "", *table(results)]
    publish(lines, "peer quality at equal tokens (issue 14)", "benchmarks.peer_quality", args.write)


if __name__ == "__main__":
    main()
