"""torchrun-aware process group helpers. A single process needs no torchrun and no init."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and exports."""
        return self.rank == 0


def setup(device: str | None = None) -> DistInfo:
    """Initialise the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs).

    `device` is "cpu", "cuda", "cuda:N" (one process only) or None/"auto" (CUDA when
    available). Under torchrun each rank takes GPU `LOCAL_RANK`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for, but CUDA is not available")
    index = local_rank
    if use_cuda and device and ":" in device:
        if world_size > 1:
            raise ValueError(f"--device {device}: under torchrun each process takes GPU "
                             "LOCAL_RANK; give --device cuda")
        index = int(device.split(":", 1)[1])
    dev = torch.device("cuda", index) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30),
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (the tensor itself in a single process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
        if not value.is_cuda:  # gloo has no AVG
            value /= dist.get_world_size()
    return value


def all_gather_objects(obj):
    """Gather one picklable object from every rank into a list (one element when single)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


T = TypeVar("T")


def main_first(info: DistInfo, work: Callable[[], T]) -> T | None:
    """Run `work` on the main process while the others wait; its result there, None elsewhere.

    Bad input found by `work` is raised on every process (`on_every_rank`), so that no rank is
    left waiting in a collective for one that has exited and each ends with the same one-line
    error.
    """
    return on_every_rank(lambda: work() if info.is_main else None)


def on_every_rank(work: Callable[[], T]) -> T:
    """Run `work` on every process and return this process's result.

    Bad input found on any rank (ValueError, which ConfigError is, or FileNotFoundError) is raised
    on every rank, the lowest rank's, prefixed with that rank and its host when it is not rank 0:
    the ranks of a multi-machine run may see different files, and none may be left waiting in a
    collective for one that has exited.
    """
    result, error = None, None
    try:
        result = work()
    except (ValueError, FileNotFoundError) as exc:
        error = exc
    for rank, (found, host) in enumerate(all_gather_objects((error, socket.gethostname()))):
        if found is not None and rank == 0:
            raise found
        if found is not None:
            try:  # the same kind of error, named by rank and host
                named = type(found)(f"rank {rank} ({host}): {found}")
            except TypeError:  # a kind that takes other arguments (UnicodeDecodeError)
                named = ValueError(f"rank {rank} ({host}): {found}")
            raise named
    return result


def teardown() -> None:
    """Destroy the process group if one was created."""
    if dist.is_initialized():
        dist.destroy_process_group()
