"""torch.distributed helpers that are no-ops in a single process.

Start several processes with ``torchrun`` (NCCL on GPUs, gloo on CPU); latentlens never
schedules processes itself. Without an initialised process group every helper acts as a
world of one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment, if present.

    Returns:
        True when a multi-process group is (now) active.
    """
    if dist.is_initialized():
        return is_distributed()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def shard_range(n: int, world: int | None = None, r: int | None = None) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` slice of ``n`` items for rank ``r`` of ``world``.

    The first ``n % world`` ranks get one extra item; a rank may get an empty slice.
    """
    world = world_size() if world is None else world
    r = rank() if r is None else r
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(items: Sequence[T], world: int | None = None, r: int | None = None) -> list[T]:
    """Every ``world``-th item starting at ``r`` (round-robin), e.g. images per rank."""
    world = world_size() if world is None else world
    r = rank() if r is None else r
    return list(items[r::world])


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_tensor(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` of every rank (same shape and dtype on all ranks), in rank order."""
    if not is_distributed():
        return [x]
    device = x.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        x = x.cuda()
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return [t.to(device) for t in out]
