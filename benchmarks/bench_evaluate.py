"""evaluate's spliced metrics against a bare forward of the same batches (issue 19, item 5).

    python -m benchmarks.bench_evaluate --run cache/saes/<run> [--tokens 4096] [--runs 1 4] [--write]

For N runs of one layer L, evaluate needs a clean, a zeroed and N spliced forwards per batch. Run the
blocks below L once and branch, and its cost is at most 1 x (the forward below L) + (2 + N) x (the
forward from L up) - the target. A bare forward (with the LM head) of the same batches is timed in the
same process; the target time is that forward's time split by the share of blocks below L. The same
run is passed N times (one group, N spliced forwards), so the figure is the evaluation's cost alone.
Never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.report import publish
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.stage import evaluate
from pipeline.sae.subject import load_llm, load_subject


def bare_seconds(run: str, tokens: int, batch_size: int, device: torch.device) -> tuple[float, int, int, int]:
    """Seconds of a plain forward (LM head included) over evaluate's held-out batches; real tokens, the
    run's layer and the model's block count."""
    subject = load_subject(run, device)
    model, blocks = load_llm(subject.cache, device)
    ids, mask = subject.cache.heldout_sequences(tokens)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            model(input_ids=torch.from_numpy(ids[i : i + batch_size]).long().to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the forwards finished, not just queued
    return time.perf_counter() - start, int(mask.sum()), subject.layers[0], len(blocks)


def evaluate_seconds(run: str, n_runs: int, tokens: int, batch_size: int, device: torch.device) -> float:
    """Seconds of evaluate's KL / CE pass, the model load included (main subtracts a separate load)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = EvaluateConfig(
            runs=[run] * n_runs,
            metrics=["kl", "ce"],
            max_tokens=tokens,
            batch_size=batch_size,
            out=out,
            device=str(device),
        )
        start = time.perf_counter()
        evaluate(cfg)
        return time.perf_counter() - start


def load_seconds(run: str, device: torch.device) -> float:
    subject = load_subject(run, device)
    start = time.perf_counter()
    load_llm(subject.cache, device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens per measurement")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward (evaluate's default)")
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 4], help="runs of the layer evaluated together")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="add the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = measure(args.run, args.tokens, args.batch_size, args.runs, args.repeats, torch.device("cpu"))
    publish(lines, "evaluate against a bare forward (issue 19)", "benchmarks.bench_evaluate", args.write)


def measure(run: str, tokens: int, batch_size: int, runs: list[int], repeats: int, device: torch.device) -> list[str]:
    """The table: evaluate of 1, N... copies of ``run`` against a bare forward, medians over ``repeats``."""
    bare: list[float] = []
    load: list[float] = []
    spent: dict[int, list[float]] = {n: [] for n in runs}
    for _ in range(repeats):
        seconds, real, layer, n_blocks = bare_seconds(run, tokens, batch_size, device)
        bare.append(seconds)
        load.append(load_seconds(run, device))
        for n in runs:
            spent[n].append(evaluate_seconds(run, n, tokens, batch_size, device) - load[-1])
        print(
            f"  bare {bare[-1]:.1f} s, load {load[-1]:.1f} s, evaluate {[v[-1] for v in spent.values()]}",
            file=sys.stderr,
        )
    return table(statistics.median(bare), {n: statistics.median(v) for n, v in spent.items()}, real, layer, n_blocks)


def table(bare: float, spent: dict[int, float], real: int, layer: int, n_blocks: int) -> list[str]:
    below = layer / n_blocks  # share of the blocks that run below the spliced layer
    lines = [
        f"Layer {layer} of {n_blocks} blocks; {real:,} held-out tokens; bare forward {real / bare:,.0f} tok/s.",
        "",
        "| runs of the layer | evaluate s | evaluate tok/s | target s (1 below + (2+N) above) | evaluate / target |",
        "|---|---|---|---|---|",
    ]
    for n, seconds in spent.items():
        target = bare * (below + (2 + n) * (1 - below))
        lines.append(f"| {n} | {seconds:.1f} | {real / seconds:,.0f} | {target:.1f} | {seconds / target:.2f}x |")
    return lines


if __name__ == "__main__":
    main()
