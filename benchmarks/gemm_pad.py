"""The selection GEMM (``selection.encoder_preacts``) in its two forms on one device: the inner size padded with
zero columns to a multiple of ``selection.GEMM_ALIGN`` (CUDA's form) and unpadded, d + 2 (the CPU's form).

The H200 profile of 2026-12-04 (benchmarks/RESULTS.md, 17:40) showed the unpadded K = 578 on cuBLAS's sm75
fallback kernel; this measures what the padding buys there. `benchmarks/gpu.py` runs it as a step.

    python -m benchmarks.gemm_pad [--device cuda] [--latents 16384] [--batch 4096] [--d 576] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.fit_steps import synchronize
from pipeline.sae.selection import Encoder, encoder_preacts, gemm_width, use_low_precision


def time_forms(d: int, latents: int, batch: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Median ms of one selection GEMM of a (batch, d) input against ``latents`` encoder rows, per form."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, d, generator=gen, device=device)  # (B, D)
    w_enc = torch.randn(latents, d, generator=gen, device=device) * d**-0.5  # (N, D)
    encoders = [Encoder(w_enc, torch.zeros(latents, device=device), x.mean(0), 32)]
    low_precision = use_low_precision(device, "auto")
    times: dict[str, list[float]] = {"padded": [], "unpadded": []}
    for _ in range(repeats + 2):  # the first two rounds warm up (allocation, kernel choice)
        for form, cpu_tuned in (("padded", False), ("unpadded", True)):  # alternating: drift falls on both
            synchronize(device)
            start = time.perf_counter()
            encoder_preacts(x, encoders, low_precision, cpu_tuned=cpu_tuned)
            synchronize(device)
            times[form].append(time.perf_counter() - start)
    return {form: 1e3 * statistics.median(values[2:]) for form, values in times.items()}


def gemm_lines(d: int, latents: int, batch: int, device: torch.device, repeats: int) -> list[str]:
    """A table of both forms' times and throughput."""
    ms = time_forms(d, latents, batch, device, repeats)
    widths = {form: gemm_width(d, padded=form == "padded") for form in ms}
    lines = [
        f"Selection GEMM, ({batch} x K) @ (K x {latents}), d = {d}, "
        f"{'bf16' if use_low_precision(device, 'auto') else 'float32'}, median of {repeats}:",
        "",
        "| form | K | ms | TFLOP/s |",
        "|---|---|---|---|",
    ]
    for form, k in widths.items():
        lines.append(f"| {form} | {k} | {ms[form]:.3f} | {2 * batch * k * latents / ms[form] / 1e9:.3g} |")
    return [*lines, "", f"- padded / unpadded time: {ms['padded'] / ms['unpadded']:.2f}x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print("\n".join(gemm_lines(args.d, args.latents, args.batch, torch.device(args.device), args.repeats)))


if __name__ == "__main__":
    main()
