"""Data parallelism the ordinary way: ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, DDP does the rest.

No launcher of our own: a plain ``python -m bot.cli train`` is one process; ``torchrun --nproc_per_node N
-m bot.cli train …`` (any number of nodes, ``--nnodes``/``--rdzv-endpoint`` as usual) starts N ranks, which
join one process group — NCCL on CUDA, gloo on the CPU — and each rank trains on its own share of the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "init_distributed",
    "launched_by_torchrun",
    "shutdown",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group when started by ``torchrun``; a single process otherwise."""
    if not launched_by_torchrun():
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(minutes=60)
        )
    return DistInfo(rank=rank, world=world, local_rank=local_rank, enabled=True)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(info: DistInfo, values: list[float]) -> list[float]:
    """Average floats over the ranks (float64)."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / info.world).tolist()


def all_reduce_sum(info: DistInfo, values: list[float]) -> list[float]:
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(info: DistInfo, flag: bool) -> bool:
    """True on every rank when it is true on any (e.g. one rank got Ctrl-C)."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
