"""Data-parallel training across processes (``torchrun``): gloo on CPU, NCCL on CUDA.

Every rank draws the same epoch permutation and augmentation codes from the same seeded generator, then takes
its shard of each global batch (``batch[rank::world]``), so the global batch and the epoch's order are those of
a single process; DistributedDataParallel averages the gradients. Only rank 0 writes the run folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``world == 1`` means an ordinary single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env() -> Dist:
    """The job torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def start(d: Dist, device: torch.device) -> None:
    if d.active and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def local_world() -> int:
    """Processes on this machine (to split its cores between them)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def from_main(d: Dist, values: tuple[float, ...], device: torch.device) -> tuple[float, ...]:
    """Rank 0's ``values`` on every rank, so all ranks take the same decisions from them."""
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return tuple(t.tolist())


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def all_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself in a single process)."""
    if d.active:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(d: Dist, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on rank 0 (a decision all ranks must take together)."""
    if not d.active:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather(d: Dist, obj):
    """Every rank's ``obj`` as a list in rank order (``[obj]`` in a single process)."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def shard(idx: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's part of a global batch of indices."""
    return idx[d.rank :: d.world] if d.active else idx
