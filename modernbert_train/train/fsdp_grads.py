"""FSDP2's gradients averaged over the ranks, as DDP's are, on every backend.

FSDP2 reduce-scatters fp32 and bf16 gradients with `ReduceOp.AVG`. Gloo in torch 2.7 runs that as a SUM
without a word (torch 2.11 averages): FSDP2 on CPU then had world_size times DDP's gradients, so the
logged `train/grad_norm` and gradient clipping were off by that factor (Adam's steps, nearly scale-free,
hid it from the loss). So the reduce-scatter is probed once; where AVG sums, each FSDP unit divides its
reduced gradients by the world size itself.
"""

import logging
import math

import torch
import torch.distributed as torch_dist
from composer.utils import dist
from torch.distributed.fsdp import FSDPModule

log = logging.getLogger(__name__)


def reduce_scatter_averages(device: torch.device) -> bool:
    """Whether `reduce_scatter_tensor(op=AVG)` averages here. A collective: every rank must call it."""
    world_size = dist.get_world_size()
    values = torch.full((world_size,), float(dist.get_global_rank() + 1), device=device)
    reduced = torch.empty(1, device=device)
    torch_dist.reduce_scatter_tensor(reduced, values, op=torch_dist.ReduceOp.AVG)
    return math.isclose(reduced.item(), (world_size + 1) / 2)


def average_fsdp_gradients(model: torch.nn.Module) -> None:
    """Make FSDP2's reduced gradients the ranks' average where the backend's AVG sums. Call on every rank
    once the model is sharded (after the Trainer is built), before the first backward."""
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if not units or dist.get_world_size() == 1:
        return
    if reduce_scatter_averages(next(model.parameters()).device):
        return
    world_size = dist.get_world_size()

    def divide(reduced: torch.Tensor) -> None:
        # Only the dtypes FSDP2 reduces with AVG; others it pre- and post-divides around a SUM itself.
        if reduced.dtype in (torch.float32, torch.bfloat16):
            reduced.div_(world_size)

    for unit in units:
        unit.set_all_reduce_hook(divide)  # runs on each unit's reduce-scatter output, in place
    log.info("this backend's reduce-scatter AVG sums: FSDP2 gradients divided by %d after it", world_size)
