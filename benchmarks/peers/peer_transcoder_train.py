"""The peers' half of benchmarks/transcoders.py: sparsify's transcoder trained on sae-pipe's cached MLP rows.

Runs in .bench-venv and never imports sae-pipe:

    .bench-venv/bin/python benchmarks/peers/peer_transcoder_train.py --rows DIR --steps 48 --out FOLDER [--skip]

DIR holds float32 .npy files written by benchmarks/transcoders.py: train_in / train_out (the training split's
MLP input and output rows as the cache stores them, shuffled alike) and held_in / held_out (every held-out row).
sparsify 1.3.3's ``Trainer`` needs a Hugging Face model to hook, so its per-step work for ``transcode=True``
(trainer.py's forward hook and optimizer step, TrainConfig defaults: loss_fn "fvu", AuxK off, no multi-TopK)
is replayed here with sparsify's own objects: ``SparseCoder(transcode=True, skip_connection=--skip)`` forward
on (MLP input, MLP output), on the first step the encoder bias := -mean(input) W_enc^T and b_dec :=
mean(output), no decoder renormalization (sparsify skips it for transcoders), loss ``fvu``, backward,
``ScheduleFreeWrapper(SignSGD, momentum 0.95)`` at lr 5e-3 / sqrt(latents / 2^14), and evaluation at the
schedule-free averaged weights. Batches: peer_steps.py's fixed shuffle, cycled.

Writes the held-out prediction and code (``--codes``, for the caller's scoring), and the SparseCoder saved
with ``save_to_disk`` in FOLDER/layers.L.mlp with the cache's two scale factors folded into its weights
(``--scales c_in,c_out``: x_n = c_in x, y_n = c_out y), so that ``sae-pipe import`` reads a transcoder of
the model's own activations. Prints ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_steps  # noqa: E402 (this folder's replay of sparsify's SAE trainer: batches, step log, summary)

MODEL = "smollm2-135m"


def first_step(sae: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    """sparsify's step-0 initialization for a transcoder: centred pre-activations, b_dec at the output mean."""
    sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T  # (N,)
    sae.b_dec.data = y.mean(0)  # (D,)


def train(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Replay sparsify's Trainer (transcode=True) for ``args.steps`` batches; the SparseCoder and its summary."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.config import TrainConfig
    from sparsify.sign_sgd import SignSGD

    config = SparseCoderConfig(num_latents=args.num_latents, k=args.k, transcode=True, skip_connection=args.skip)
    tcfg = TrainConfig(sae=config)  # library defaults otherwise
    torch.manual_seed(args.seed)
    sae = SparseCoder(x.shape[1], tcfg.sae, "cpu", dtype=torch.float32)
    lr = tcfg.lr or 5e-3 / (sae.num_latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    order = peer_steps._batches(len(x), args.batch_size, args.steps, args.seed)
    log = peer_steps.StepLog()
    for step in range(args.steps):
        xb, yb = x[order[step]], y[order[step]]  # gathered outside the timed region
        t0, c0 = time.perf_counter(), time.process_time()
        if step == 0:
            first_step(sae, xb, yb)
        out = sae(x=xb, y=yb, dead_mask=None, total_variance=(yb - yb.mean(0)).pow(2).sum())
        (out.fvu + tcfg.auxk_alpha * out.auxk_loss).backward()  # auxk_alpha 0 by default: AuxK off
        opt.step()
        opt.zero_grad()
        log.step_s.append(time.perf_counter() - t0)
        log.cpu_s.append(time.process_time() - c0)
        log.fvu.append(float(out.fvu.detach()))
    opt.eval()  # schedule-free: evaluate and save at the averaged weights, as sparsify does
    extra = {"optimizer": f"ScheduleFreeWrapper(SignSGD(lr={lr:.3g}), momentum=0.95)", "num_latents": args.num_latents}
    return sae, peer_steps._summary("sparsify", log, args.batch_size, 0, {**extra, "k": args.k})


def held_codes(sae: Any, x: torch.Tensor) -> dict[str, np.ndarray]:
    """sparsify's own forward on every held-out row: prediction (R, D), top-k activations and indices (R, k)."""
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), 4096):
            out = sae(x[i : i + 4096])
            parts.append((out.sae_out, out.latent_acts, out.latent_indices))
    y_hat, acts, indices = (torch.cat(p).numpy() for p in zip(*parts))
    return {"x_hat": y_hat, "acts": acts, "indices": indices}


def save_folded(sae: Any, folder: Path, c_in: float, c_out: float) -> None:
    """Save with the rows' scale factors folded in: the saved coder maps raw MLP input to raw MLP output."""
    with torch.no_grad():
        sae.encoder.weight.mul_(c_in)
        sae.W_dec.div_(c_out)
        sae.b_dec.div_(c_out)
        if sae.W_skip is not None:
            sae.W_skip.mul_(c_in / c_out)
    sae.save_to_disk(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "sae_pipe_model": MODEL}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", required=True, help="folder of train_in/train_out/held_in/held_out .npy")
    p.add_argument("--skip", action="store_true", help="skip_connection: a skip transcoder")
    p.add_argument("--num-latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--scales", default="1,1", help="c_in,c_out: the cache's factors for mlp_in and mlp_out")
    p.add_argument("--codes", required=True, help="where the held-out prediction and code go (.npz)")
    p.add_argument("--out", required=True, help="folder to save the SparseCoder in (a sparsify run folder)")
    args = p.parse_args()
    rows = Path(args.rows)
    x, y = (torch.from_numpy(np.load(rows / f"train_{s}.npy")) for s in ("in", "out"))  # float32, (R, D) each
    start = time.perf_counter()
    sae, res = train(x, y, args)
    res["train_s"] = time.perf_counter() - start  # the library's import and setup included
    codes = held_codes(sae, torch.from_numpy(np.load(rows / "held_in.npy")))
    np.savez(args.codes, x_hat=codes["x_hat"], acts=codes["acts"], indices=codes["indices"])
    c_in, c_out = (float(v) for v in args.scales.split(","))
    save_folded(sae, Path(args.out) / f"layers.{args.layer}.mlp", c_in, c_out)
    res |= {
        "version": importlib.metadata.version("eai-sparsify"),
        "folder": args.out,
        "tokens": args.steps * args.batch_size,
    }
    res |= {"peak_rss_mb": peer_steps._rss_mb(), "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
