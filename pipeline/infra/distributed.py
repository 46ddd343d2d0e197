"""torchrun support: rank and world size from the environment, a process group when needed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from pipeline.infra.device import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's processes (rank 0 of 1 when run alone)."""

    rank: int = 0  # global rank
    world: int = 1  # number of processes
    local_rank: int = 0  # rank on this machine (selects the GPU)

    @classmethod
    def from_env(cls) -> Ranks:
        """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun) and join the process group."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def alone(self) -> Ranks:
        """This process working by itself (no collectives), still on its own GPU."""
        return Ranks(0, 1, self.local_rank)

    def share(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (any picklable object; no-op alone)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (no-op alone)."""
        if self.world > 1:
            dist.barrier()

    def device(self, name: str) -> torch.device:
        """The device for ``--device name``; under torchrun, ``auto``/``cuda`` means this rank's own GPU."""
        if (self.world > 1 or self.local_rank > 0) and name in ("auto", "cuda") and torch.cuda.is_available():
            name = f"cuda:{self.local_rank}"
        return resolve_device(name)

    def average_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` by its mean over ranks, in place (no-op alone)."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world
        return tensor

    def any_(self, flags: torch.Tensor) -> torch.Tensor:
        """Elementwise OR of a boolean tensor over ranks (no-op alone)."""
        if self.world == 1:
            return flags
        counts = flags.to(torch.int32)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        return counts.bool()

    def smallest(self, value: int) -> int:
        """The minimum of ``value`` over ranks (every rank must run the same number of steps)."""
        if self.world == 1:
            return value
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        tensor = torch.tensor([value], dtype=torch.int64, device=device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel: gradients are averaged across ranks before each optimizer step."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
