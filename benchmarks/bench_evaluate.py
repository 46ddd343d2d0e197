"""evaluate's spliced metrics against a bare forward of the same batches (issue 19, item 5).

    python -m benchmarks.bench_evaluate --run cache/saes/<run> [--tokens 4096] [--runs 1 4] [--write]

For N runs of one layer L, evaluate needs a clean, a zeroed and N spliced forwards per batch. Run the
blocks below L once and branch, and its cost is at most 1 x (the forward below L) + (2 + N) x (the
forward from L up) - the target. A bare forward (with the LM head) of the same batches is timed in the
same process, whole and from L up (blocks L.., final norm and LM head, resumed from a stored layer-L
input); below L is the difference. The same
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
from typing import NamedTuple, cast

import torch
from torch import nn

from benchmarks.fit_steps import synchronize
from benchmarks.report import publish
from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.live.subject import load_llm, load_subject
from pipeline.llm.replay import resume, stem


class Bare(NamedTuple):
    """A plain forward of evaluate's held-out batches, timed whole and from the spliced layer up."""

    whole: float  # seconds of the full forward, LM head included
    above: float  # seconds of blocks L.. + final norm + LM head, resumed from a stored layer-L input
    tokens: int  # real (unpadded) tokens
    layer: int
    n_blocks: int


def bare_seconds(run: str, tokens: int, batch_size: int, device: torch.device) -> Bare:
    """The bare forward's two parts: what evaluate may run once (below L) and (2 + N) times (above,
    with the LM head, which a share of blocks would leave out: 21 % of SmolLM2-135M's forward)."""
    subject = load_subject(run, device)
    model, blocks = load_llm(subject.cache, device)
    layer = subject.layers[0]
    ids, mask = subject.cache.heldout_sequences(tokens)
    head = cast(nn.Module, model.get_output_embeddings())  # type: ignore[operator]
    whole = above = 0.0
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            batch = torch.from_numpy(ids[i : i + batch_size]).long().to(device)  # (B, T)
            clock = time.perf_counter()
            model(input_ids=batch, use_cache=False)
            whole += _since(clock, device)
            start = stem(model, blocks, batch, layer)
            if start is None:
                raise SystemExit("this model's final norm is unknown: evaluate runs whole forwards, nothing to split")
            clock = time.perf_counter()
            head(resume(model, blocks, start))
            above += _since(clock, device)
    return Bare(whole, above, int(mask.sum()), layer, len(blocks))


def _since(start: float, device: torch.device) -> float:
    """Seconds since ``start``, once the device has finished (CUDA kernels are only queued at return)."""
    synchronize(device)
    return time.perf_counter() - start


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
        evaluate.run(cfg)
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
    bare: list[Bare] = []
    load: list[float] = []
    spent: dict[int, list[float]] = {n: [] for n in runs}
    for _ in range(repeats):
        bare.append(bare_seconds(run, tokens, batch_size, device))
        load.append(load_seconds(run, device))
        for n in runs:
            spent[n].append(evaluate_seconds(run, n, tokens, batch_size, device) - load[-1])
        print(
            f"  bare {bare[-1].whole:.1f} s (above the layer {bare[-1].above:.1f} s), load {load[-1]:.1f} s, "
            f"evaluate {[v[-1] for v in spent.values()]}",
            file=sys.stderr,
        )
    middle = bare[0]._replace(
        whole=statistics.median(b.whole for b in bare), above=statistics.median(b.above for b in bare)
    )
    return table(middle, {n: statistics.median(v) for n, v in spent.items()})


def table(bare: Bare, spent: dict[int, float]) -> list[str]:
    below = bare.whole - bare.above
    lines = [
        f"Layer {bare.layer} of {bare.n_blocks} blocks; {bare.tokens:,} held-out tokens; bare forward "
        f"{bare.tokens / bare.whole:,.0f} tok/s, {bare.whole:.1f} s, of which {bare.above:.1f} s from the layer up "
        "(LM head included, timed by resuming from a stored layer input).",
        "",
        "| runs of the layer | evaluate s | evaluate tok/s | target s (1 below + (2+N) above) | evaluate / target |",
        "|---|---|---|---|---|",
    ]
    for n, seconds in spent.items():
        target = below + (2 + n) * bare.above
        lines.append(f"| {n} | {seconds:.1f} | {bare.tokens / seconds:,.0f} | {target:.1f} | {seconds / target:.2f}x |")
    return lines


if __name__ == "__main__":
    main()
