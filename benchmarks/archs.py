"""Architectures at equal tokens: every trainable architecture of ours against its peer trainer, per target L0.

    python -m benchmarks.archs --write                         # the demo cache, target L0 16,32,64,128
    python -m benchmarks.archs --l0 32 --scratch /tmp/archs    # the issue's bar only, rows kept for reruns
    python -m benchmarks.archs --results A/results.jsonl,B/results.jsonl --write   # runs made apart, one table
    python -m benchmarks.archs --l0 32 --only batchtopk,matryoshka --seed 1    # ours again at another seed
    (--peer-python PATH: the peers' venv, default .bench-venv/bin/python; --only NAME,...: a subset)

Contenders, one after another, each in a process of its own (benchmarks.child: its wall time and VmHWM):

- ours: ``sae-pipe fit --arch A --k L0 --lr 0`` (the demo's params.yaml fit section otherwise: 4096 latents,
  batch 4096; the lr each architecture's auto rule picks), topk also with ``--multi-topk``; for standard,
  gated and jumprelu ``k`` is the target L0 their automatic penalty steers to. ``--seed S`` (not 0) sets fit's
  seed and data_seed, rows "NAME, seed S": how far a row moves with the seed alone, the yardstick for a change's
  effect on FVU.
- SAELens 6.54.12 (benchmarks/peers/peer_archs.py): BatchTopK, Matryoshka BatchTopK (our prefixes as its
  widths), JumpReLU (its target-L0 mode) trained by its own ``SAETrainer.fit()`` with the runner's defaults
  (``--peer-lr X``: at Adam lr X instead, rows "SAELens ... at lr X"; ``--peer-dead-window S`` also counts a
  latent silent for S steps as dead for its aux loss, 1000 by default, which a 196-step run never reaches).
  Standard and Gated have no L0 target there: they run once per ``--l1`` coefficient. The bar reads each peer
  setting apart, at our L0 where its runs allow (archs_report.peer_reading).
- sparsify 1.3.3: multi-TopK (peer_steps.py's replay of its Trainer, ``multi_topk=True``).

The TopK family (topk, topk with --multi-topk, sparsify's multi-TopK) is also scored at 4k, the wider k
multi-TopK trains for: one SAE used at several k is the point of multi-TopK.

All see the cache's normalized training rows for the same number of tokens (the demo's: the training split
twice). Every SAE ends as a sae-pipe run (peers through ``sae-pipe import``) and is scored on every held-out
row the same way (:func:`quality`); KL per token and CE recovered come from ``sae-pipe evaluate``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from benchmarks.archs_report import PEER_LR, publish_all
from benchmarks.child import own_peak_rss_mb, own_rss_mb, run_child
from benchmarks.run import training_rows
from pipeline.cache.reader import ActivationCache
from pipeline.evaluate.stage import DENSE
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.infra.params import build_config, load_params
from pipeline.interop.importing import import_checkpoint
from pipeline.sae.archs.topk import MULTI_TOPK_FACTOR
from pipeline.sae.folder import load_sae
from pipeline.sae.quality import Reconstruction

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (16, 32, 64, 128)
HELD_BATCH = 4096
AT_WIDE_K = ("topk", "topk+multi", "multi-topk")  # contenders' arch also scored at MULTI_TOPK_FACTOR x k


class Contender(NamedTuple):
    name: str  # table row
    side: str  # ours | saelens | sparsify
    arch: str  # --arch (ours), the peer script's --arch (peers)
    pair: str  # ours: the peer row it is held against ("" = none); peers: ""
    per_target: bool  # one run per target L0 (False: SAELens standard / gated, one run per --l1)


CONTENDERS = [
    Contender("topk", "ours", "topk", "", True),
    Contender("topk multi-topk", "ours", "topk+multi", "sparsify multi-TopK", True),
    Contender("batchtopk", "ours", "batchtopk", "SAELens BatchTopK", True),
    Contender("matryoshka", "ours", "matryoshka", "SAELens Matryoshka BatchTopK", True),
    Contender("jumprelu", "ours", "jumprelu", "SAELens JumpReLU", True),
    Contender("standard", "ours", "standard", "SAELens Standard", True),
    Contender("gated", "ours", "gated", "SAELens Gated", True),
    Contender("sparsify multi-TopK", "sparsify", "multi-topk", "", True),
    Contender("SAELens BatchTopK", "saelens", "batchtopk", "", True),
    Contender("SAELens Matryoshka BatchTopK", "saelens", "matryoshka", "", True),
    Contender("SAELens JumpReLU", "saelens", "jumprelu", "", True),
    Contender("SAELens Standard", "saelens", "standard", "", False),
    Contender("SAELens Gated", "saelens", "gated", "", False),
]


def quality(x: np.ndarray, run: str, k: int | None = None) -> dict[str, float]:
    """FVU, L0, dead share and dense latents of a run over every held-out row x (R, D), in its inference form
    (``k``: a top-k SAE's code at that k instead of its own).

    A latent fires where its code is > 0; dead: fires on no row; dense: on more than DENSE (10 %) of rows.
    """
    sae, record = load_sae(run)
    sae.eval()
    rec, fires, active = Reconstruction(), torch.zeros(record["sae"]["n_latents"], dtype=torch.long), 0
    with torch.no_grad():
        for i in range(0, len(x), HELD_BATCH):
            xb = torch.from_numpy(x[i : i + HELD_BATCH])  # (b, D)
            out = sae(xb) if k is None else sae(xb, k=k)
            rec.add(xb.double(), out.x_hat.double())
            fired = out.latents.acts > 0  # (b, k) padding slots hold 0
            fires += torch.bincount(out.latents.indices[fired], minlength=len(fires))
            active += int(fired.sum())
    return {
        "fvu": rec.fvu,
        "l0": active / len(x),
        "dead_share": float((fires == 0).double().mean()),
        "dense_latents": int((fires > DENSE * len(x)).sum()),
    }


def held_rows(cache: ActivationCache, layer: int) -> np.ndarray:
    """Every held-out row (R, D) of ``layer`` as float32, in stored order."""
    return np.concatenate([rows[:, 0] for _, rows in cache.heldout_rows([layer])]).astype(np.float32)


def ours_child(args: argparse.Namespace) -> dict[str, Any]:
    """One fit of ours (params.yaml's fit section, the architecture's auto lr) into ``args.runs``."""
    arch, multi = args.arch.removesuffix("+multi"), args.arch.endswith("+multi")
    overrides = {"cache": args.cache, "out": args.runs, "arch": arch, "k": args.k, "lr": 0.0, "multi_topk": multi}
    overrides |= {"max_tokens": args.tokens, "sweep": {}, "seed": args.seed, "data_seed": args.seed}
    overrides["overwrite"] = True  # a run left by an earlier benchmark would be kept, and its time read as ~0 s
    cfg = build_config(FitConfig, load_params(ROOT / "params.yaml"), "fit", overrides)
    rss_before = own_rss_mb()
    start = time.perf_counter()
    (run,) = fit.run(cfg).runs
    train_s = time.perf_counter() - start
    _, record = load_sae(run)
    training = record["training"]
    return {
        "library": "sae-pipe",
        "trainer": f"sae-pipe fit --arch {arch}" + (" --multi-topk" if multi else ""),
        "optimizer": f"{training['optimizer']} lr {training['lr']:.3g}, {training['schedule']}",
        "setting": {"k": args.k},
        "train_s": train_s,  # the whole fit call: cache opening and streaming included
        "loop_s": record["result"]["train_s"],  # of which the training loop (fit's cfg.json)
        "data_wait_s": record["result"]["data_wait_s"],  # of which the loop waited for batches
        "tokens": record["steps"] * cfg.batch_size,
        "steps": record["steps"],
        "rss_before_steps_mb": rss_before,
        "folder": run.url,
        "peak_rss_mb": own_peak_rss_mb(),
        "threads": torch.get_num_threads(),  # as the peers' children report theirs: tok/s means little without it
    }


def command(c: Contender, setting: float, paths: dict[str, Path], args: argparse.Namespace) -> list[str]:
    """The contender's process at one setting (k / target L0, or SAELens's l1_coefficient)."""
    trained_at = f"-lr{args.peer_lr:g}-w{args.peer_dead_window}" if c.side == "saelens" else ""  # 0: the default
    tag = f"{c.side}-{c.arch}-{setting:g}{trained_at}"
    if c.side == "ours":
        cmd = [sys.executable, "-m", "benchmarks.archs", "--child", "--cache", args.cache, "--arch", c.arch]
        runs = paths["runs"] / (tag + (f"-seed{args.seed}" if args.seed else ""))  # a seed's runs apart
        cmd += ["--seed", str(args.seed), "--runs", str(runs)]
        return [*cmd, "--k", str(int(setting)), "--tokens", str(args.tokens)]
    cmd = [args.peer_python, "benchmarks/peers/peer_archs.py", "--lib", c.side, "--arch", c.arch]
    cmd += ["--data", str(paths["train"]), "--heldout", str(paths["held"]), "--out", str(paths["peers"] / tag)]
    cmd += ["--steps", str(args.tokens // 4096), "--batch-size", "4096", "--num-latents", str(args.latents)]
    cmd += ["--lr", f"{args.peer_lr:g}", "--dead-window", str(args.peer_dead_window)] if c.side == "saelens" else []
    if c.per_target:
        return [*cmd, "--k", str(int(setting)), "--widths", ",".join(map(str, prefixes(args.latents)))]
    return [*cmd, "--coeff", f"{setting:g}"]


def row_name(c: Contender, args: argparse.Namespace) -> str:
    """The contender's table row; ours at ``--seed``, and a SAELens trainer at ``--peer-lr`` (and
    ``--peer-dead-window``), get a row and a bar reading of their own."""
    if c.side == "ours":
        return f"{c.name}, seed {args.seed}" if args.seed else c.name
    if args.peer_lr <= 0:
        return c.name
    window = f", dead window {args.peer_dead_window}" if args.peer_dead_window > 0 else ""
    return f"{c.name}{PEER_LR}{args.peer_lr:g}{window}"


def learning_rate(text: str) -> float:
    """--peer-lr: a finite lr > 0, or 0 for the peer's default."""
    value = float(text)  # not a number: argparse's own "invalid learning_rate value"
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a learning rate: give a finite number > 0 (0: the default)")
    return value


def peer_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--peer-dead-window: steps >= 0, and only beside --peer-lr, whose rows it names (alone, its runs would be
    read as the peer's defaults); --seed: >= 0, and for ours only."""
    if args.peer_dead_window < 0:
        parser.error(f"--peer-dead-window {args.peer_dead_window}: give a number of steps >= 0 (0 = SAELens's 1000)")
    if args.peer_dead_window and not args.peer_lr:
        parser.error("--peer-dead-window needs --peer-lr (the lr its rows are named by; SAELens's is 0.0003)")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: give a seed >= 0 (0 = the runs' usual one)")
    peers = [c.name for c in CONTENDERS if c.side != "ours" and (not args.only or c.name in args.only)]
    if args.seed and peers and not (args.results or args.child):
        parser.error(
            f"--seed sets our fits' seeds only; pass --only with ours alone (peers chosen: {', '.join(peers)})"
        )


def prefixes(n: int) -> list[int]:
    """Our matryoshka default (n/16, n/8, n/4, n/2, n), given to SAELens as its widths."""
    return [n // 16, n // 8, n // 4, n // 2, n]


def as_run(result: dict[str, Any], c: Contender, scratch: Path) -> str:
    """The contender's SAE as a sae-pipe run folder (peers: imported from the folder their library saved)."""
    if c.side == "ours":
        return result["folder"]
    source = Path(result["folder"]) / ("layers.11" if c.side == "sparsify" else "")
    out = scratch / "imported" / Path(result["folder"]).name
    return import_checkpoint(str(source), model="smollm2-135m", out=str(out), cache_root=str(scratch)).url


def spliced(run: str, cache: str, tokens: int, scratch: Path) -> dict[str, Any]:
    """KL per token and CE recovered of the run spliced into the LLM (``sae-pipe evaluate``)."""
    out = scratch / "evaluate" / f"{Path(run).name}.json"
    cmd = [sys.executable, "-m", "pipeline.cli", "evaluate", run, "--metrics", "kl,ce", "--cache", cache]  # this tree
    cmd += ["--max-tokens", str(tokens), "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        return {"kl_error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = next(iter(metrics["runs"].values())) if "runs" in metrics else metrics
    return {"kl_per_token": metrics["kl_per_token"], "ce_recovered": metrics["ce_recovered"]}


def settings(c: Contender, args: argparse.Namespace) -> list[float]:
    return [float(t) for t in args.l0] if c.per_target else [float(v) for v in args.l1]


def run_all(args: argparse.Namespace, paths: dict[str, Path], x: np.ndarray) -> list[dict[str, Any]]:
    """Every contender at every setting, sequentially; results also appended to scratch/results.jsonl."""
    results, log = [], paths["scratch"] / "results.jsonl"
    for c in [c for c in CONTENDERS if not args.only or c.name in args.only]:
        for setting in settings(c, args):
            print(f"archs: {c.name} at {setting:g}", file=sys.stderr, flush=True)
            result = run_child(command(c, setting, paths, args), ROOT)
            result["load_after"] = Path("/proc/loadavg").read_text().split()[0]  # the machine may be shared
            run = as_run(result, c, paths["scratch"])
            result |= {"name": row_name(c, args), "pair": c.pair, "run": run}
            result["target"] = setting if c.per_target else None
            result |= quality(x, run)
            if c.arch in AT_WIDE_K:  # held-out quality only: evaluate's KL splices the run at its own k
                wide_k = MULTI_TOPK_FACTOR * int(setting)
                result["wide"] = {"k": wide_k} | quality(x, run, wide_k)
            if args.kl_tokens >= 0:
                result |= spliced(run, args.cache, args.kl_tokens, paths["scratch"])
            result["tokens_per_s"] = result["tokens"] / result["train_s"]
            results.append(result)
            with log.open("a") as f:
                f.write(json.dumps(result) + "\n")
    return results


def load_results(files: list[str]) -> list[dict[str, Any]]:
    """The rows of earlier runs' results.jsonl files, file after file; a later file's row of the same contender
    at the same setting replaces the earlier one in its place (a rerun at newer code)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for line in (line for f in files for line in Path(f).read_text().splitlines() if line.strip()):
        row = json.loads(line)
        rows[(row["name"], json.dumps(row.get("setting"), sort_keys=True))] = row
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default="", help="activation cache (default: the demo's, found or extracted)")
    parser.add_argument("--peer-python", default=str(ROOT / ".bench-venv" / "bin" / "python"))
    parser.add_argument("--l0", type=lambda s: [int(v) for v in s.split(",")], default=list(TARGETS))
    parser.add_argument("--l1", type=lambda s: [float(v) for v in s.split(",")], default=[2.0, 5.0, 10.0])
    parser.add_argument("--only", type=lambda s: s.split(","), default=[], help="contender names, comma-separated")
    parser.add_argument("--tokens", type=int, default=0, help="training tokens each (0 = the demo's: the split twice)")
    parser.add_argument("--kl-tokens", type=int, default=8192, help="held-out tokens of evaluate's KL/CE (-1: skip)")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--peer-lr", type=learning_rate, default=0.0, help="SAELens's Adam lr (0 = its default)")
    parser.add_argument("--peer-dead-window", type=int, default=0, help="with --peer-lr: SAELens's dead_feature_window")
    parser.add_argument(
        "--seed", type=int, default=0, help="our fits' seed and data_seed (rows 'NAME, seed S'; ours only)"
    )
    parser.add_argument("--scratch", default="/tmp/archs", help="rows, runs, peers' folders and results.jsonl")
    parser.add_argument("--write", action="store_true", help="add the table and plot to benchmarks/RESULTS.md")
    parser.add_argument("--results", type=lambda s: s.split(","), default=[], help="publish earlier runs instead: "
                        "their results.jsonl files, comma-separated (e.g. contenders run apart)")  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one fit of ours
    parser.add_argument("--arch", default="", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--runs", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    peer_settings(parser, args)
    if args.child:
        print("RESULT " + json.dumps(ours_child(args)), flush=True)
        return
    if not args.cache:  # the demo's cache (params.yaml), as benchmarks.peer_quality finds or extracts it
        demo = load_params(ROOT / "params.yaml")
        args.cache = extract.run(build_config(ExtractConfig, demo, "extract", {}, ("model", "data"))).folder.url
    store, scratch = ActivationCache.open(args.cache), Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    if args.results:
        publish_all(load_results(args.results), args, store.key)
        return
    paths = {"scratch": scratch, "runs": scratch / "runs", "peers": scratch / "peers", "held": scratch / "held.npy"}
    paths["train"] = scratch / "train.npy" if (scratch / "train.npy").exists() else training_rows(store, 12, scratch)
    if not paths["held"].exists():
        np.save(paths["held"], held_rows(store, 12))
    args.tokens = args.tokens or 2 * store.rows("train") // 4096 * 4096  # the demo's budget in whole batches
    results = run_all(args, paths, np.load(paths["held"]))
    publish_all(results, args, store.key)


if __name__ == "__main__":
    main()
