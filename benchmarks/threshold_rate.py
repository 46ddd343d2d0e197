"""BatchTopK's threshold rate (pipeline/sae/archs/batchtopk.py: THRESHOLD_RATE), chosen on training rows.

    python -m benchmarks.threshold_rate --cache cache/activations/smollm2-135m-L12-aba0ad6dcabed5a6
    python -m benchmarks.threshold_rate --cache C --rates 0.01,0.05 --k 16,32 --scratch /tmp/rate

The rate weighs each batch's smallest kept activation in the moving average that becomes the inference
threshold; the threshold should give the L0 the batch top-k trained at (k). Per rate and k, one BatchTopK fit
at the demo's settings otherwise (4096 latents, 2 epochs, Adam at the automatic lr) with the module's rate set
for that fit, then `evaluate --metrics nmse,train_fvu --max-tokens 0`: L0 and FVU at the threshold over every
training row (what a rate is chosen by: the L0 nearest k) and over every held-out row (reported only).
Printed as a table; never run inside the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
from pathlib import Path
from typing import Any

from pipeline.evaluate import stage as evaluate
from pipeline.evaluate.config import EvaluateConfig
from pipeline.fit import stage as fit
from pipeline.fit.config import FitConfig
from pipeline.sae.archs import batchtopk


def measured(cache: str, rate: float, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fit at ``rate`` and ``k`` (its own folder: the rate is not a setting, so it is not in the run's
    name), scored on the training and held-out rows."""
    out = Path(args.scratch) / f"rate-{rate:g}-k{k}"
    batchtopk.THRESHOLD_RATE = rate  # read by BatchTopKSAE.track_threshold every step
    cfg = FitConfig(cache=cache, arch="batchtopk", layer=args.layer, latents=args.latents, k=k, epochs=2, out=str(out))
    (run,) = fit.run(cfg).runs
    config = EvaluateConfig(
        runs=[run.url], metrics=["nmse", "train_fvu"], max_tokens=0, suite=[], out=str(out / "evaluate")
    )
    (metrics,) = evaluate.run(config).metrics
    return {"rate": rate, "k": k, **{key: metrics[key] for key in ("train_l0", "train_fvu", "l0", "fvu")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a cache of one layer (the demo's)")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=lambda s: [int(v) for v in s.split(",")], default=[32])
    parser.add_argument("--rates", type=lambda s: [float(v) for v in s.split(",")], default=[0.01, 0.02, 0.05, 0.1])
    parser.add_argument("--scratch", default="/tmp/sae-pipe-threshold-rate")
    args = parser.parse_args()
    if not all(0 < rate <= 1 for rate in args.rates) or min(args.k) < 1:  # NaN fails the comparison too
        parser.error(f"--rates {args.rates} must lie in (0, 1] and --k {args.k} be at least 1")
    rows = [measured(args.cache, rate, k, args) for k in args.k for rate in args.rates]
    print("| k | rate | training L0 | off k | training FVU | held-out L0 | held-out FVU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        off = r["train_l0"] / r["k"] - 1
        print(f"| {r['k']} | {r['rate']:g} | {r['train_l0']:.2f} | {off:+.1%} | {r['train_fvu']:.4f} | {r['l0']:.2f} "
              f"| {r['fvu']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
