"""A circuit mask step against its bound (issue 27, item 8: within 2x).

    python -m benchmarks.circuit_speed [--layers 3,6,9,12] [--latents 1024] [--pairs 32] [--lambdas 4] [--repeats 3]

The setting of the issue: SmolLM2-135M, TopK SAEs of 1024 latents (k 16) at layers 3, 6, 9 and 12, sva pairs,
four lambdas. SAE weights are random (the cost does not depend on them). The bound of one step is one forward
and one backward over the pairs from the lowest SAE layer up, the part below computed once: here the blocks
from that layer up run on the stored residual stream (made to require a gradient, so the backward runs through
every block) and the two answer logits are read, with no SAE at all. A mask step of L lambdas trained
together covers L copies of the pairs, so its bound is that forward and backward over the pairs tiled L times.
The step time is (time of steps + 1 steps - time of 1 step) / steps of the real ``train_masks``, so setup
(tiling, stems, ends) is not counted. Medians over ``--repeats``. Never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import statistics
import time

import torch

from pipeline.cache.normalize import Normalizer
from pipeline.circuit.measures import ends
from pipeline.circuit.methods import Lens, MaskHyper, train_masks
from pipeline.circuit.spliced import Batch, Site, ablation_values, answer_logits, batches, stem_of, tiled
from pipeline.circuit.tasks import generate
from pipeline.llm.model import find_blocks, load_model, load_tokenizer, resolve_model
from pipeline.llm.replay import resume
from pipeline.sae.archs.topk import TopKSAE
from pipeline.sae.interface import SaeConfig

CPU = torch.device("cpu")


def bound(lens: Lens, parts: list[Batch]) -> float:
    """Seconds of one forward and backward over ``parts`` from the lowest site's block up, no SAE."""
    layer = min(s.layer for s in lens.sites)
    stems = [stem_of(lens.model, lens.blocks, layer, b, "clean") for b in parts]  # the part below, once
    start = time.perf_counter()
    for batch, below in zip(parts, stems):
        assert below is not None
        hidden = below.hidden.clone().requires_grad_()  # (B, T, D): the backward reaches the lowest block
        last = resume(lens.model, lens.blocks, below._replace(hidden=hidden))[:, -1]  # (B, D)
        logits = answer_logits(lens.model, last, batch)  # (B, 2)
        (logits[:, 0] - logits[:, 1]).sum().backward()
    return time.perf_counter() - start


def step_time(lens: Lens, train: list[Batch], lams: list[float], steps: int) -> float:
    """Seconds per mask step of ``lams`` trained together (setup excluded by a difference of two runs)."""
    base = ends(lens, train)
    targets = list(base.full.split([len(b.clean) for b in train]))
    times = []
    for n in (1, steps + 1):
        start = time.perf_counter()
        train_masks(lens, train, targets, base.gap, lams, MaskHyper(n, 0.1, 100.0), seed=0)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / steps


def open_lens(layers: list[int], latents: int, k: int, pairs: int) -> tuple[Lens, list[Batch]]:
    """SmolLM2 with random TopK SAEs at ``layers`` and ``pairs`` sva pairs in batches of 32."""
    source = resolve_model("smollm2-135m")
    model = load_model(source, CPU, torch.float32).requires_grad_(False)
    blocks = find_blocks(model)
    tokenizer = load_tokenizer(source)
    d = int(model.get_input_embeddings().weight.shape[1])  # type: ignore[operator]
    generator = torch.Generator().manual_seed(0)
    sites = [
        Site(
            layer,
            TopKSAE(SaeConfig("topk", d, latents, k, [layer]), generator).requires_grad_(False),
            Normalizer("standardize"),
            f"random-L{layer}",
        )  # fmt: skip
        for layer in layers
    ]
    train = batches(generate("sva", tokenizer, pairs, 0), 32, set(tokenizer.all_special_ids), CPU)
    return Lens(model, blocks, sites, ablation_values(model, blocks, sites, train, "mean")), train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="3,6,9,12")
    parser.add_argument("--latents", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--lambdas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    lens, train = open_lens([int(x) for x in args.layers.split(",")], args.latents, args.k, args.pairs)
    lams = [0.001 * 3**i for i in range(args.lambdas)]
    stacked = [tiled(b, len(lams)) for b in train]
    runs: dict[str, list[float]] = {"bound": [], "stacked": [], "bound1": [], "one": []}
    for _ in range(args.repeats):
        runs["bound"].append(bound(lens, stacked))
        runs["stacked"].append(step_time(lens, train, lams, args.steps))
        runs["bound1"].append(bound(lens, train))
        runs["one"].append(step_time(lens, train, lams[:1], args.steps))
    med = {name: statistics.median(times) for name, times in runs.items()}
    pairs = sum(len(b.clean) for b in train)
    print(
        f"{pairs} pairs, SAEs at layers {args.layers} ({args.latents} latents, k {args.k}), medians of {args.repeats}"
    )
    print(f"bound, fwd+bwd over {len(lams)} x the pairs: {med['bound']:.3f} s")
    print(
        f"mask step, {len(lams)} lambdas together: {med['stacked']:.3f} s  ({med['stacked'] / med['bound']:.2f}x bound)"
    )
    print(f"bound, fwd+bwd over the pairs once: {med['bound1']:.3f} s")
    print(f"mask step, one lambda: {med['one']:.3f} s  ({med['one'] / med['bound1']:.2f}x bound); "
          f"{len(lams)} lambdas one after another: {len(lams) * med['one']:.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()
