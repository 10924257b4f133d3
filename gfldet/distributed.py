"""The few torch.distributed helpers gfldet needs; each is a no-op in a single process."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def reduce_mean(value: Tensor) -> Tensor:
    """Mean of a tensor over all processes (a copy; autograd does not flow through it)."""
    value = value.detach().clone()
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / get_world_size()
    return value


def all_gather_objects(obj: object) -> list[object]:
    """Every process's `obj`, in rank order (pickled through the process group)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
