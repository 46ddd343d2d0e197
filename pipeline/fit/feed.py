"""Stored batches onto the training device, the next one copied while the current step runs.

On CUDA a batch crosses the bus as float16 (half float32's bytes) from a pinned host buffer, on a
side stream, one batch ahead of the step that uses it; the step's stream waits for that copy alone.
On the CPU there is nothing to overlap: each batch is converted when the step asks for it.
:class:`Waited` adds up how long training sat waiting for its next batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor


def to_device(batch: np.ndarray, device: torch.device) -> Tensor:
    """A stored batch (float16) as float32 on the training device, copied when asked (the plain path)."""
    tensor = torch.from_numpy(batch)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device=device, dtype=torch.float32)


class Staged(NamedTuple):
    """A batch on its way to the device."""

    x: Tensor  # (L, B, D) float32 on the device; on CUDA still being written by the side stream
    copied: Any  # torch.cuda.Event recorded after its copy, or None off CUDA


class Staging:
    """Two host buffers used in turn: batch i+1 is written into one while batch i's copy may still read
    the other. Allocated at the first batch and reused, since pinning memory costs more than copying it.

    ``cuda`` (default: when ``device`` is a GPU) pins the buffers and copies on a side stream; off, the
    same buffer rotation runs with ordinary memory and synchronous copies, which is what lets the tests
    check the ordering on a CPU.
    """

    def __init__(self, device: torch.device, cuda: bool | None = None) -> None:
        self.device = device
        self.cuda = device.type == "cuda" if cuda is None else cuda
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.buffers: list[Tensor] = []  # two (L, B, D) host buffers in the stored dtype
        self.copied: list[Any] = [None, None]  # the event of the last copy out of each buffer
        self.turn = 0

    def stage(self, batch: np.ndarray) -> Staged:
        """Write ``batch`` into the next host buffer and start its copy to the device."""
        i, self.turn = self.turn, 1 - self.turn
        if not self.buffers or self.buffers[0].shape != batch.shape:
            dtype = torch.from_numpy(batch[:0]).dtype  # the stored dtype: float16 crosses the bus, not float32
            self.buffers = [torch.empty(batch.shape, dtype=dtype, pin_memory=self.cuda) for _ in range(2)]
            self.copied = [None, None]
        if self.copied[i] is not None:
            self.copied[i].synchronize()  # the copy that read this buffer two batches ago is done
        host = self.buffers[i]
        host.copy_(torch.from_numpy(batch))
        if not self.cuda:
            # A new tensor even when the batch is already float32 (an int8 cache's decoded rows): the
            # buffer is overwritten two batches later, while the step may still hold this one.
            return Staged(host.to(self.device, torch.float32, copy=True), None)
        with torch.cuda.stream(self.side):
            x = host.to(self.device, non_blocking=True).to(torch.float32)  # (L, B, D), converted on the GPU
            self.copied[i] = torch.cuda.Event()
            self.copied[i].record(self.side)
        return Staged(x, self.copied[i])

    def ready(self, staged: Staged) -> Tensor:
        """The staged batch, safe to use on the current stream."""
        if staged.copied is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(staged.copied)  # this batch's copy only: the next one's keeps running
            staged.x.record_stream(main)  # allocated on the side stream: not reused while the step reads it
        return staged.x


def device_batches(
    batches: Iterable[np.ndarray], device: torch.device, staging: Staging | None = None
) -> Iterator[Tensor]:
    """``batches`` (L, B, D) as float32 tensors on ``device``, in order, none lost.

    With a ``staging`` (default: on CUDA) each batch's copy starts before the previous batch is handed
    to the step, so the copy overlaps that step's kernels; without, :func:`to_device` per batch.
    """
    staging = staging or (Staging(device) if device.type == "cuda" else None)
    if staging is None:
        yield from (to_device(batch, device) for batch in batches)
        return
    source = iter(batches)
    ahead = next(source, None)
    staged = staging.stage(ahead) if ahead is not None else None
    while staged is not None:
        after = next(source, None)
        following = staging.stage(after) if after is not None else None  # queued before this step runs
        yield staging.ready(staged)
        staged = following


class Waited:
    """Batches as ``batches`` yields them, with the seconds the consumer spent blocked asking for the next one:
    a fit's time waiting for data (reading, checking, shuffling, copying), not training on it."""

    def __init__(self, batches: Iterable[Tensor]) -> None:
        self.batches = batches
        self.seconds = 0.0

    def __iter__(self) -> Iterator[Tensor]:
        source = iter(self.batches)
        while True:
            start = time.perf_counter()
            batch = next(source, None)
            self.seconds += time.perf_counter() - start
            if batch is None:
                return
            yield batch
