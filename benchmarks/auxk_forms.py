"""AuxK's two forms (pipeline/sae/auxk_kernels.py: dense GEMMs up to DENSE_AUX x k_aux dead latents, the sparse
kernels past it), timed against each other to place DENSE_AUX.

    taskset -c 0 env OMP_NUM_THREADS=1 python -m benchmarks.auxk_forms
    python -m benchmarks.auxk_forms --dead 100,600,1728 --k-aux 288 --precision float32

Per number of dead latents, one forward and backward of ``aux_decode`` (a batch of random rows, d 576, the
decoder's tangent gradient, a sum-of-squares loss), the median of the repeats after the first, in each form. The
dead latents' biases make about a third of their pre-activations positive, as early in a demo fit. Printed as a
table; never run inside the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.sae import auxk_kernels
from pipeline.sae.selection import use_low_precision


def timed(n: int, dense: bool, args: argparse.Namespace, low_precision: bool) -> float:
    """Milliseconds of one forward and backward over ``n`` dead latents in the dense form or the sparse one."""
    auxk_kernels.DENSE_AUX = 10**9 if dense else 0  # read by aux_decode at every call
    gen = torch.Generator().manual_seed(0)
    x, target = torch.randn(args.batch, args.d, generator=gen), torch.randn(args.batch, args.d, generator=gen)
    w_enc = (torch.randn(n, args.d, generator=gen) * args.d**-0.5).requires_grad_()
    b_enc = (torch.randn(n, generator=gen) * 0.3 - 0.4).requires_grad_()  # about a third of the entries positive
    w_dec = F.normalize(torch.randn(n, args.d, generator=gen), dim=1).requires_grad_()
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        guess = auxk_kernels.aux_decode(
            x, w_enc, b_enc, torch.zeros(args.d), w_dec, min(args.k_aux, n - 1), low_precision, tangent=True
        )
        F.mse_loss(guess, target, reduction="sum").backward()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dead", default="100,300,600,1200,1728", help="numbers of dead latents, comma-separated")
    parser.add_argument("--k-aux", type=int, default=288, help="AuxK's k (fit's default: d / 2)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    low_precision = use_low_precision(torch.device("cpu"), args.precision)
    print(f"| dead latents | x k_aux | dense ms | sparse ms |  (k_aux {args.k_aux}, low precision {low_precision})")
    print("|---|---|---|---|")
    for n in (int(v) for v in args.dead.split(",")):
        dense, sparse = timed(n, True, args, low_precision), timed(n, False, args, low_precision)
        print(f"| {n} | {n / args.k_aux:.1f} | {dense:.1f} | {sparse:.1f} |")


if __name__ == "__main__":
    main()
