"""What the data code asks of the other ranks: a flag agreed by all of them, and where such a collective's
tensors live. Without a process group (one process) a rank is the whole world."""

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where a collective's tensors live: the current GPU under nccl, else the CPU (gloo)."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def every_rank(flag: bool) -> bool:
    """True when `flag` is true on every rank."""
    return _agreed(flag, dist.ReduceOp.MIN)


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on some rank."""
    return _agreed(flag, dist.ReduceOp.MAX)


def _agreed(flag: bool, op) -> bool:
    if not distributed():
        return flag
    value = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(value, op=op)
    return bool(value.item())
