"""The peers' half of benchmarks/archs.py: one SAE trained by a peer library's own trainer on cached rows.

Runs in .bench-venv (sae-lens, eai-sparsify) and never imports sae-pipe:

    .bench-venv/bin/python benchmarks/peers/peer_archs.py --lib saelens --arch batchtopk --k 32 \
        --data train.npy --heldout held.npy --steps 196 --out DIR
    .bench-venv/bin/python benchmarks/peers/peer_archs.py --lib sparsify --arch multi-topk --k 32 ...

- SAELens 6.54.12: the architecture's TrainingSAE (BatchTopK, Matryoshka BatchTopK, JumpReLU, Standard,
  Gated) with its config defaults, trained by SAELens's own ``SAETrainer.fit()`` (its loop, its
  ``training_forward_pass`` losses, Adam 3e-4 constant with gradient clipping, dead-latent windows) fed
  from an iterator over the rows, which is what ``SAETrainer`` takes as its data provider; only the LLM
  activation store of ``LanguageModelSAERunnerConfig`` is left out. The SAE is saved with
  ``save_inference_model`` (BatchTopK and Matryoshka become a JumpReLU SAE with the batch threshold).
  JumpReLU uses SAELens's target-L0 mode (``jumprelu_sparsity_loss_mode="quadratic"``, ``target_l0=k``);
  Standard and Gated have no L0 target in SAELens, so ``--coeff`` sets their ``l1_coefficient``.
- sparsify 1.3.3: multi-TopK, through peer_steps.py's replay of its Trainer (TrainConfig defaults) with
  ``SparseCoderConfig(multi_topk=True)``, saved with ``save_to_disk`` as ``layers.11`` (our layer 12). Its
  own held-out FVU is reported at k (encode, decode) and at 4k (its forward's multi-TopK output).

Both write the folder with the metadata sae-pipe's import reads (the model, and the rows' normalization:
sae-pipe's per-token ``standardize``), print ``RESULT {json}`` with the training time and peak RSS, and
the held-out FVU and L0 of the saved SAE as the library itself computes them.
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
import peer_steps  # noqa: E402 (this folder's replay of sparsify's trainer)

MODEL, HOOK, SPARSIFY_HOOK = "smollm2-135m", "blocks.12.hook_resid_pre", "layers.11"  # our layer 12
NORMALIZATION = {"method": "standardize", "eps": 1e-6}  # what the cache stored (pipeline/cache/normalize.py)


def _fvu_l0(x: torch.Tensor, x_hat: torch.Tensor, code: torch.Tensor) -> dict[str, float]:
    return {"own_fvu": peer_steps._fvu(x, x_hat), "own_l0": float((code != 0).sum()) / len(x)}


NAMES = {"batchtopk": "BatchTopK", "matryoshka": "MatryoshkaBatchTopK", "jumprelu": "JumpReLU"}
NAMES |= {"standard": "Standard", "gated": "Gated"}  # ours -> SAELens's class prefix


def saelens_sae(arch: str, d_in: int, n: int, k: int, coeff: float, widths: list[int]) -> Any:
    """SAELens's training SAE of ``arch``: its config defaults but for size, k / target L0 or L1, and metadata."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    if arch not in NAMES:
        raise SystemExit(f"SAELens arch {arch!r}: use one of {', '.join(NAMES)}")
    choices: dict[str, dict[str, Any]] = {
        "batchtopk": {"k": k},
        "matryoshka": {"k": k, "matryoshka_widths": widths},
        "jumprelu": {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": k},
        "standard": {"l1_coefficient": coeff},
        "gated": {"l1_coefficient": coeff},
    }
    options = choices[arch]
    meta = SAEMetadata(model_name=MODEL, hook_name=HOOK, sae_pipe_normalization=NORMALIZATION)
    cfg = getattr(sae_lens, f"{NAMES[arch]}TrainingSAEConfig")(
        d_in=d_in, d_sae=n, dtype="float32", device="cpu", metadata=meta, **options
    )
    return getattr(sae_lens, f"{NAMES[arch]}TrainingSAE")(cfg)


def saelens_train(x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """SAETrainer.fit() on the rows (one shuffled order, cycled), then save_inference_model into args.out."""
    import sae_lens
    from sae_lens import SAE, LanguageModelSAERunnerConfig
    from sae_lens.config import LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainer

    widths = [int(w) for w in args.widths.split(",")] if args.widths else []
    torch.manual_seed(args.seed)
    sae = saelens_sae(args.arch, x.shape[1], args.num_latents, args.k, args.coeff, widths)
    run = LanguageModelSAERunnerConfig(  # the runner's defaults, read through its own trainer-config builder
        sae=sae.cfg,
        training_tokens=args.steps * args.batch_size,
        train_batch_size_tokens=args.batch_size,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        **({"lr": args.lr} if args.lr > 0 else {}),
        **({"dead_feature_window": args.dead_window} if args.dead_window > 0 else {}),
    )
    tcfg = run.to_sae_trainer_config()
    order = peer_steps._batches(len(x), args.batch_size, args.steps, args.seed)
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=(x[i] for i in order))
    rss_before = peer_steps._current_rss_mb()
    start = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - start
    sae.save_inference_model(args.out)
    saved = json.loads((Path(args.out) / "cfg.json").read_text())  # SAETrainer.fit's end-of-training stats
    stats = {key: saved["metadata"][key] for key in ("l0", "num_dead_features") if key in saved["metadata"]}
    loaded = SAE.load_from_disk(args.out)
    held = torch.from_numpy(np.load(args.heldout))
    with torch.no_grad():
        codes = [loaded.encode(held[i : i + 4096]) for i in range(0, len(held), 4096)]
        x_hat = torch.cat([loaded.decode(c) for c in codes])
    return {
        "library": "SAELens",
        "version": sae_lens.__version__,
        "trainer": f"{type(sae).__name__} + SAETrainer.fit(), saved as {type(loaded).__name__}",
        "optimizer": f"Adam {tcfg.lr:g} ({tcfg.lr_scheduler_name}), clip 1.0, dead window {tcfg.dead_feature_window}",
        "setting": {"coeff": args.coeff} if args.arch in ("standard", "gated") else {"k": args.k},
        "train_s": train_s,
        "rss_before_steps_mb": rss_before,
        "trainer_stats": stats,
        **_fvu_l0(held, x_hat, torch.cat(codes)),
    }


def sparsify_train(x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """peer_steps.sparsify_steps with multi_topk on; the SparseCoder saved as a sparsify run folder."""
    import sparsify

    start = time.perf_counter()
    res = peer_steps.sparsify_steps(
        x, x.shape[1], args.num_latents, args.k, args.batch_size, args.steps, 0, multi_topk=True
    )
    wall = time.perf_counter() - start
    coded = peer_steps._LAST_MODEL[0]  # its closure holds the trained SparseCoder (schedule-free: averaged weights)
    sae = next(c.cell_contents for c in coded.__closure__ if isinstance(c.cell_contents, sparsify.SparseCoder))
    assert sae.cfg.multi_topk
    folder = Path(args.out) / SPARSIFY_HOOK
    sae.save_to_disk(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(
        json.dumps({**cfg, "sae_pipe_normalization": NORMALIZATION, "sae_pipe_model": MODEL})
    )
    held = torch.from_numpy(np.load(args.heldout))
    with torch.no_grad():  # at k, as an SAE is used: sparsify's forward would return the 4k reconstruction
        parts = [sae.encode(held[i : i + 4096]) for i in range(0, len(held), 4096)]
        x_hat = torch.cat([sae.decode(p.top_acts, p.top_indices) for p in parts])
        code = torch.cat([p.top_acts for p in parts])
        wide = torch.cat([sae(held[i : i + 4096]).sae_out for i in range(0, len(held), 4096)])  # its 4k output
    return {
        "library": "sparsify",
        "version": importlib.metadata.version("eai-sparsify"),
        "trainer": "peer_steps.py replay of sparsify's Trainer, multi_topk=True",
        "optimizer": res["optimizer"],
        "setting": {"k": args.k},
        "train_s": sum(res["step_s_all"]),  # the steps alone (peer_steps times them without the row gather)
        "process_train_s": wall,
        "rss_before_steps_mb": res["rss_before_steps_mb"],
        **_fvu_l0(held, x_hat, code),
        "own_fvu_wide": peer_steps._fvu(held, wide),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lib", choices=["saelens", "sparsify"], required=True)
    p.add_argument(
        "--arch", required=True, help="saelens: batchtopk|matryoshka|jumprelu|standard|gated; sparsify: multi-topk"
    )
    p.add_argument("--k", type=int, default=32, help="k, or the target L0 (SAELens JumpReLU)")
    p.add_argument("--coeff", type=float, default=1.0, help="SAELens standard / gated: l1_coefficient")
    p.add_argument("--widths", default="", help="SAELens matryoshka: matryoshka_widths, comma-separated")
    p.add_argument("--num-latents", type=int, default=4096)
    p.add_argument("--lr", type=float, default=0.0, help="SAELens: Adam's lr (0 = its runner's default)")
    p.add_argument(
        "--dead-window", type=int, default=0, help="SAELens: steps a latent must stay silent to count as dead for its "
        "aux loss, dead_feature_window (0 = its default, 1000)"
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", required=True, help="training rows, float32 .npy (rows, d)")
    p.add_argument("--heldout", required=True, help="held-out rows, float32 .npy")
    p.add_argument("--out", required=True, help="folder to save the trained SAE in")
    args = p.parse_args()
    if args.dead_window < 0:
        p.error(f"--dead-window {args.dead_window}: give a number of steps >= 0 (0 = SAELens's 1000)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    x = torch.from_numpy(np.load(args.data))  # float32 already: no conversion copy
    res = saelens_train(x, args) if args.lib == "saelens" else sparsify_train(x, args)
    res |= {"tokens": args.steps * args.batch_size, "steps": args.steps, "batch_size": args.batch_size}
    res |= {"peak_rss_mb": peer_steps._rss_mb(), "torch_version": torch.__version__, "folder": args.out}
    res["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
