"""Load sae-pipe exports with the real SAELens and sparsify and compare their outputs with sae-pipe's.

    .venv/bin/sae-pipe export RUN --format saelens --out /tmp/x/saelens
    .venv/bin/sae-pipe export RUN --format sparsify --out /tmp/x/sparsify
    .venv/bin/python -m benchmarks.export_inputs RUN /tmp/x     # held-out rows and sae-pipe's reconstructions
    .bench-venv/bin/python benchmarks/peers/check_exports.py /tmp/x

Last checked with SAELens 6.54.12 and sparsify 1.3.3 on the demo run (SmolLM2 layer 12, 4096 latents):
sparsify matches to 3e-6 (max abs); SAELens's `layer_norm` re-standardizes the already standardized
rows with eps 1e-5 instead of 1e-6, so a few top-k ties flip, and the NMSE of the two agrees to 6 digits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


def nmse(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float((((x - x_hat) ** 2).sum(1) / (x**2).sum(1)).mean())


def main(folder: Path) -> None:
    from sae_lens import SAE
    from sparsify import SparseCoder

    x = np.load(folder / "inputs.npy").astype(np.float32)
    ours = np.load(folder / "ours.npy")
    inputs = torch.from_numpy(x)
    with torch.no_grad():
        saelens = SAE.load_from_disk(str(folder / "saelens"))(inputs).numpy()
        (hookpoint,) = (folder / "sparsify").glob("layers.*")
        sparsify = SparseCoder.load_from_disk(str(hookpoint))(inputs).sae_out.numpy()
    for name, out in (("SAELens", saelens), ("sparsify", sparsify)):
        print(f"{name}: max |diff| {np.abs(out - ours).max():.2e}, nmse {nmse(x, out):.6f} vs ours {nmse(x, ours):.6f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
