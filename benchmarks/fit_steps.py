"""sae-pipe's training step (TopK by default, any one-layer architecture with --arch) timed like
benchmarks/peers/peer_steps.py times the peers.

Runs in the project's venv, one process per measurement (its peak RSS is its own VmHWM, see benchmarks.child):

    python -m benchmarks.fit_steps --data train.npy --precision bfloat16 [--device cuda] [--arch batchtopk --k 128]

Each step is exactly what `sae-pipe fit` does per batch (pipeline.fit.train.train_step: forward, NormMSE
loss, backward with sparse kernels, Adam, decoder renormalization, dead-latent counters), with the
default settings (auto lr, warmup-decay over the timed run). Prints one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from benchmarks.child import own_peak_rss_mb
from pipeline.fit.config import FitConfig, Training
from pipeline.fit.optim import auto_lr
from pipeline.fit.train import init_pre_bias, make_member, train_step
from pipeline.infra.device import keep_freed_memory
from pipeline.infra.files import Folder
from pipeline.sae.interface import REGISTRY, SaeConfig
from pipeline.sae.selection import use_low_precision

ONE_LAYER_ARCHS = ("topk", "batchtopk", "jumprelu", "matryoshka", "standard", "gated")  # fit's SAEs of one layer


def run(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # a run pinned to one core: 1
        keep_freed_memory()
    data = torch.from_numpy(np.load(args.data).astype(np.float32, copy=False)).to(device)  # (R, D)
    low = use_low_precision(device, args.precision)
    lr, k_aux = auto_lr("adam", args.num_latents, args.steps * args.batch_size, args.batch_size), data.shape[1] // 2
    settings = Training.of(FitConfig(arch=args.arch, multi_topk=args.multi_topk), lr=lr, k_aux=k_aux, dead_tokens=10**9)
    prefixes = REGISTRY[args.arch].plan_prefixes("", args.num_latents)  # matryoshka's default sizes, else []
    cfg = SaeConfig(args.arch, data.shape[1], args.num_latents, args.k, [0], prefixes=prefixes)
    member = make_member(Folder.at(args.scratch), cfg, settings, low, [0], device)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).to(device)
    times, cpu, curve = [], [], []
    for step in range(args.steps):
        batch = data[order[(torch.arange(args.batch_size, device=device) + step * args.batch_size) % len(data)]]
        if step == 0:
            init_pre_bias(member, batch)
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = train_step(member, batch, args.steps)
        synchronize(device)  # the step's kernels finished, not just queued
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        curve.append(metrics["fvu"])
    timed = times[args.warmup :]
    return {
        "library": "sae-pipe",
        "arch": member.model.cfg.arch,  # the architecture that trained, as built
        "precision": "bfloat16" if low else "float32",
        "tokens_per_s_median": args.batch_size / statistics.median(timed),
        "step_s_all": times,
        "cpu_util_median": statistics.median(c / w for c, w in zip(cpu[args.warmup :], timed)),
        "fvu_curve": curve,
        "lr": settings.lr,
        "peak_rss_mb": own_peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0,
    }


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA; nothing on the CPU), so a timer measures them finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--arch", default="topk", choices=ONE_LAYER_ARCHS, help="the architecture (fit --arch)")
    parser.add_argument("--num-latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--scratch", default="/tmp/sae-pipe-bench-run")
    parser.add_argument("--multi-topk", action="store_true", help="also train the code at 4k (fit --multi-topk)")
    print("RESULT " + json.dumps(run(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
