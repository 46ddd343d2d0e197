"""Held-out rows of a run's cache and sae-pipe's reconstructions, for benchmarks/peers/check_exports.py.

python -m benchmarks.export_inputs RUN OUT_DIR      # writes OUT_DIR/inputs.npy and OUT_DIR/ours.npy
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.reader import ActivationCache
from pipeline.sae.folder import load_sae


def main(run: str, out: Path) -> None:
    sae, cfg = load_sae(run)
    cache = ActivationCache.open(cfg["cache"]["path"])
    rows = np.concatenate([r[:, 0] for _, r in cache.heldout_rows(cfg["sae"]["layers"][:1], 2000)])
    with torch.no_grad():
        ours = sae(torch.from_numpy(rows.astype(np.float32))).x_hat.numpy()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "inputs.npy", rows)
    np.save(out / "ours.npy", ours)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
