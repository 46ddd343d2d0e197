"""Per-step training throughput of two peer TopK-SAE libraries on CPU (sparsify also on CUDA, --device cuda).

Runs inside the separate bench venv (see requirements.txt in this folder):

    /work/main/.bench-venv/bin/python benchmarks/peers/peer_steps.py            # defaults below
    /work/main/.bench-venv/bin/python benchmarks/peers/peer_steps.py --steps 8 --warmup 2 --rows 20000

Two functions with the same signature and return value:

* ``sparsify_steps`` -- EleutherAI sparsify 1.3.3. Its ``Trainer`` needs a HF model,
  so the per-step sequence of ``sparsify/trainer.py`` (``Trainer.fit`` and its
  forward hook, loss_fn="fvu", default TrainConfig) is replayed here by calling
  sparsify's own objects: ``SparseCoder`` forward (fused encoder + eager
  ``embedding_bag`` decoder), loss ``fvu + auxk_alpha*auxk + multi_topk_fvu/8``,
  backward, ``remove_gradient_parallel_to_decoder_directions``, the default
  optimizer ``ScheduleFreeWrapper(SignSGD, momentum=0.95)`` with
  lr = 5e-3 / sqrt(num_latents / 2**14), ``set_decoder_norm_to_unit_norm`` before
  every forward, b_dec := batch mean on step 0, and the dead-latent bookkeeping.
* ``saelens_steps`` -- SAELens 6.54.12. Builds a ``TopKTrainingSAE`` with default
  ``TopKTrainingSAEConfig`` and drives SAELens's own ``SAETrainer`` one batch at a
  time through its public ``step()`` seam, i.e. exactly its ``_train_step``:
  ``training_forward_pass`` (MSE sum-over-d mean-over-batch + TopK aux loss),
  firing bookkeeping, backward, ``clip_grad_norm_(1.0)``, ``Adam(lr=3e-4,
  betas=(0.9, 0.999))``, zero_grad, constant LR scheduler step. SAELens does no
  per-step decoder-norm upkeep for TopK (``rescale_acts_by_decoder_norm=True``
  normalises inside the forward instead).

Both return::

    {"tokens_per_s_median", "step_s_all", "peak_rss_mb", "fvu_final", "fvu_curve", ...}

``step_s_all`` holds every step (warm-up included); the median is over the steps
after ``warmup``. ``fvu_curve[i]`` is sum||x - x_hat||^2 / sum||x - mean(x)||^2
on step i's training batch, from the forward pass of that step (i.e. before
that step's update). ``peak_rss_mb`` is the process's VmHWM (peak since its exec),
so run each function in a fresh process (``__main__`` does) to keep them apart.

All code here is ours; the peers are only called through their public APIs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

# Keep the sparsify import banner ("Triton not installed ...") off stdout when we emit JSON.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _rss_mb() -> float:
    """Peak resident set size of this process since its exec, in MiB (Linux VmHWM, kB).

    Not ru_maxrss: that also counts the image exec replaced, i.e. the parent that started this process.
    """
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _batches(n_rows: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Row indices per step: a fixed shuffle of the data, cycled (same for both peers)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_rows, generator=g)
    out = []
    for s in range(steps):
        idx = (torch.arange(batch_size) + s * batch_size) % n_rows
        out.append(perm[idx])
    return out


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x = x.double()
    return float((x - x_hat.double()).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@dataclass
class StepLog:
    """What a peer's loop records per step; RSS is taken when the log is made, before the first step."""

    step_s: list[float] = field(default_factory=list)  # wall seconds
    cpu_s: list[float] = field(default_factory=list)  # process CPU seconds (all threads)
    fvu: list[float] = field(default_factory=list)  # training-batch FVU
    rss_before: float = field(default_factory=_current_rss_mb)  # MiB


def _summary(name: str, log: StepLog, batch_size: int, warmup: int, extra: dict[str, Any]) -> dict[str, Any]:
    step_s, cpu_s, fvu = log.step_s, log.cpu_s, log.fvu
    timed = step_s[warmup:] if len(step_s) > warmup else step_s
    timed_cpu = cpu_s[warmup:] if len(cpu_s) > warmup else cpu_s
    med = statistics.median(timed)
    return {
        "library": name,
        "tokens_per_s_median": batch_size / med,
        "step_s_median": med,
        "step_s_all": step_s,
        # Process CPU seconds per step (all threads). cpu_util ~= torch threads when this
        # process had the cores to itself; lower means other work was competing for them.
        "cpu_s_all": cpu_s,
        "cpu_util_median": statistics.median(c / w for c, w in zip(timed_cpu, timed)),
        "loadavg_after": open("/proc/loadavg").read().split()[:3],
        "peak_rss_mb": _rss_mb(),
        "rss_before_steps_mb": log.rss_before,
        "fvu_final": fvu[-1],
        "fvu_curve": fvu,
        "batch_size": batch_size,
        "steps": len(step_s),
        "warmup": warmup,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        **extra,
    }


# --------------------------------------------------------------------------- sparsify
def sparsify_steps(
    x: torch.Tensor,
    d_in: int,
    num_latents: int,
    k: int,
    batch_size: int,
    steps: int,
    warmup: int,
    seed: int = 0,
    device: str = "cpu",
    multi_topk: bool = False,
) -> dict[str, Any]:
    """Replay sparsify 1.3.3 ``Trainer.fit`` per-step work (loss_fn="fvu", defaults; ``multi_topk``: its
    SparseCoderConfig's, the code at 4k trained too)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # a run pinned to one core: 1
    import sparsify
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.config import TrainConfig
    from sparsify.sign_sgd import SignSGD
    from sparsify.utils import decoder_impl

    assert x.ndim == 2 and x.shape[1] == d_in
    x = x.float().contiguous().to(device)
    tcfg = TrainConfig(sae=SparseCoderConfig(num_latents=num_latents, k=k, multi_topk=multi_topk))  # its defaults
    acc_steps = tcfg.grad_acc_steps * tcfg.micro_acc_steps  # 1 * 1
    denom = acc_steps * tcfg.wandb_log_frequency

    # Trainer.__init__: torch.manual_seed(seed); SparseCoder(width, cfg, device, dtype=float32)
    torch.manual_seed(seed)
    sae = SparseCoder(d_in, tcfg.sae, device, dtype=torch.float32)
    # Trainer.__init__, optimizer == "signum" (the default):
    lr = tcfg.lr or 5e-3 / (sae.num_latents / (2**14)) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    num_tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
    exclude_tokens = torch.tensor(tcfg.exclude_tokens, dtype=torch.long)  # noqa: F841 (empty)

    # Trainer.fit: "Use Tensor Cores even for fp32 matmuls" (a no-op for CPU fp32 numerics
    # here: oneDNN maps it to tf32, which this CPU lacks). Restored afterwards.
    prev_prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")

    order = _batches(x.shape[0], batch_size, steps, seed)
    log = StepLog()
    try:
        for step in range(steps):
            batch = x[order[step]]  # data loading is outside the timed region
            t0, c0 = time.perf_counter(), time.process_time()

            # --- body of Trainer.fit's forward hook ---
            tokens_mask = torch.ones(batch.shape[0], dtype=torch.bool, device=device)
            n_tok = int(tokens_mask.sum().item())
            all_outputs = batch.detach().clone()  # noqa: F841 (hook always does this)
            outputs = batch[tokens_mask]
            inputs = outputs  # autoencoding
            if step == 0 and not tcfg.finetune:
                sae.b_dec.data = outputs.mean(0).to(sae.dtype)
            if sae.cfg.normalize_decoder and not tcfg.sae.transcode:
                sae.set_decoder_norm_to_unit_norm()
            dead_mask = num_tokens_since_fired > tcfg.dead_feature_threshold if tcfg.auxk_alpha > 0 else None
            total_variance = (outputs - outputs.mean(0)).pow(2).sum()
            fvu_step = 0.0
            for in_chunk, out_chunk in zip(inputs.chunk(tcfg.micro_acc_steps), outputs.chunk(tcfg.micro_acc_steps)):
                out = sae(x=in_chunk, y=out_chunk, dead_mask=dead_mask, total_variance=total_variance)
                did_fire[out.latent_indices.flatten()] = True
                fvu_step += float(out.fvu.detach() / denom)  # the trainer's avg_fvu sync
                loss = out.fvu + tcfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
                loss.div(acc_steps).backward()

            # --- optimizer part of Trainer.fit (grad_acc_steps == 1 -> every batch) ---
            if tcfg.sae.normalize_decoder and not tcfg.sae.transcode:
                sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            # (no LR schedulers for signum; k_decay_steps == 0 -> k stays cfg.k)
            with torch.no_grad():
                num_tokens_since_fired += n_tok
                num_tokens_since_fired[did_fire] = 0
                did_fire.zero_()
            if x.is_cuda:  # the step's kernels finished, not just queued
                torch.cuda.synchronize(x.device)

            log.step_s.append(time.perf_counter() - t0)
            log.cpu_s.append(time.process_time() - c0)
            log.fvu.append(fvu_step)
    finally:
        torch.set_float32_matmul_precision(prev_prec)

    opt.eval()  # schedule-free: evaluate (and save, as sparsify does) at the averaged weights

    def coded(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = sae(h.to(x.device))
        return out.sae_out.cpu(), out.latent_acts.cpu(), out.latent_indices.cpu()

    _LAST_MODEL[:] = [coded]
    return _summary(
        "sparsify",
        log,
        batch_size,
        warmup,
        {
            "version": getattr(sparsify, "__version__", "1.3.3"),
            "optimizer": f"ScheduleFreeWrapper(SignSGD(lr={lr:.3g}), momentum=0.95)",
            "decoder_impl": decoder_impl.__name__,
            "num_latents": sae.num_latents,
            "k": sae.cfg.k,
        },
    )


# --------------------------------------------------------------------------- SAELens
def saelens_steps(
    x: torch.Tensor, d_in: int, num_latents: int, k: int, batch_size: int, steps: int, warmup: int, seed: int = 0
) -> dict[str, Any]:
    """SAELens 6.54.12 TopKTrainingSAE driven by its own SAETrainer.step() (defaults)."""
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    import sae_lens
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    assert x.ndim == 2 and x.shape[1] == d_in
    x = x.float().contiguous()
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=num_latents, k=k, dtype="float32", device="cpu"))
    lr = 3e-4  # LanguageModelSAERunnerConfig default; lr_end defaults to lr / 10 there
    tcfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        device="cpu",
        lr=lr,
        lr_end=lr / 10,
    )
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))
    sae.to("cpu")  # what SAETrainer.fit does first

    order = _batches(x.shape[0], batch_size, steps, seed)
    log = StepLog()
    for step in range(steps):
        batch = x[order[step]]
        t0, c0 = time.perf_counter(), time.process_time()
        # --- body of SAETrainer.fit's loop, minus wandb logging / pbar / checkpoints ---
        trainer.maybe_reset_sparsity()
        out = trainer.step(batch)
        trainer.n_training_steps += 1
        log.step_s.append(time.perf_counter() - t0)
        log.cpu_s.append(time.process_time() - c0)
        with torch.no_grad():  # outside the timed region: SAELens only does this on log steps
            log.fvu.append(_fvu(out.sae_in, out.sae_out.detach()))

    def coded(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        code = sae.encode(h)  # (B, N) dense, at most k non-zero per row
        acts, indices = code.topk(sae.cfg.k, dim=-1)  # (B, k)
        return sae.decode(code), acts, indices  # decode(encode(h)) is SAELens's forward

    _LAST_MODEL[:] = [coded]
    return _summary(
        "sae_lens",
        log,
        batch_size,
        warmup,
        {
            "version": sae_lens.__version__,
            "optimizer": f"Adam(lr={lr}, betas=({tcfg.adam_beta1}, {tcfg.adam_beta2})) "
            "+ clip_grad_norm_(1.0), constant LR",
            "losses_last_step": {n: float(v) for n, v in out.losses.items()},
            "rescale_acts_by_decoder_norm": sae.cfg.rescale_acts_by_decoder_norm,
            "num_latents": sae.cfg.d_sae,
            "k": sae.cfg.k,
        },
    )


# --------------------------------------------------------------------------- demo data
def make_dataset(
    rows: int = 60_000, d: int = 576, rank: int = 64, noise: float = 0.3, seed: int = 1234
) -> torch.Tensor:
    """Gaussian stand-in for LLM activations: rank-`rank` signal + isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g) / rank**0.5
    scales = torch.logspace(0, -1, rank)  # decaying spectrum
    z = torch.randn(rows, rank, generator=g) * scales
    return (z @ basis + noise * torch.randn(rows, d, generator=g)).float()


def _child(which: str, args: argparse.Namespace) -> None:
    import numpy as np

    if args.data:  # a float32 file loads without a conversion copy (peak RSS counts such copies)
        x = torch.from_numpy(np.load(args.data).astype("float32", copy=False))
    else:
        x = make_dataset(args.rows, args.d)
    fn = {"sparsify": sparsify_steps, "saelens": saelens_steps}[which]
    start = time.perf_counter()
    if args.device != "cpu" and which != "sparsify":
        raise SystemExit(f"{which} is measured on the CPU only here (--device cpu)")
    on = {"device": args.device, "multi_topk": args.multi_topk} if which == "sparsify" else {}
    res = fn(x, x.shape[1], args.num_latents, args.k, args.batch_size, args.steps, args.warmup, **on)
    res["train_s"] = time.perf_counter() - start  # the library's import and setup included
    if args.heldout:
        held = torch.from_numpy(np.load(args.heldout).astype("float32", copy=False))
        with torch.no_grad():
            coded = [_LAST_MODEL[0](held[i : i + 4096]) for i in range(0, len(held), 4096)]
        x_hat, acts, indices = (torch.cat(parts) for parts in zip(*coded))
        res["fvu_heldout"] = _fvu(held, x_hat)
        if args.codes:  # for benchmarks/peer_quality.py, which scores every contender the same way
            np.savez(args.codes, x_hat=x_hat.numpy(), acts=acts.numpy(), indices=indices.numpy())
    print("RESULT " + json.dumps(res), flush=True)


# The trained model as h (B, D) -> (reconstruction (B, D), activations (B, k), latent ids (B, k)).
_LAST_MODEL: list[Any] = []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="a .npy (rows, d) of training activations")
    p.add_argument("--heldout", default=None, help="a .npy (rows, d) to measure FVU on after training")
    p.add_argument(
        "--codes", default=None, help="with --heldout and --child: write the held-out reconstruction and codes (.npz)"
    )
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--num-latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu | cuda (sparsify only)")
    p.add_argument("--only", choices=["sparsify", "saelens"], default=None)
    p.add_argument("--multi-topk", action="store_true", help="sparsify: also train the code at 4k (multi_topk)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the libraries alternately this many times (fresh process each) "
        "and keep each library's fastest run; the machine is shared, so "
        "wall-clock numbers are noisy",
    )
    p.add_argument("--child", choices=["sparsify", "saelens"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        _child(args.child, args)
        return

    # One fresh process per library so the peak RSS (VmHWM) is not shared between them.
    import subprocess

    runs: dict[str, list[dict[str, Any]]] = {}
    libs = [args.only] if args.only else ["sparsify", "saelens"]
    for which in [w for _ in range(args.repeats) for w in libs]:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            which,
            *sum(
                (
                    [f"--{k.replace('_', '-')}", str(v)]
                    for k, v in vars(args).items()
                    if k not in ("only", "child", "repeats") and v is not None
                ),
                [],
            ),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"{which} run failed (rc={proc.returncode})")
        res = json.loads(line[len("RESULT ") :])
        res["process_wall_s"] = wall
        runs.setdefault(which, []).append(res)
        print(
            f"{which}: {res['tokens_per_s_median']:.0f} tok/s (cpu_util {res['cpu_util_median']:.2f}, {wall:.0f}s)",
            file=sys.stderr,
        )
    results = {}
    for which, rs in runs.items():
        best = dict(max(rs, key=lambda r: r["tokens_per_s_median"]))
        best["tokens_per_s_median_each_repeat"] = [r["tokens_per_s_median"] for r in rs]
        best["cpu_util_median_each_repeat"] = [r["cpu_util_median"] for r in rs]
        results[which] = best
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
