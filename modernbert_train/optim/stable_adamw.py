"""StableAdamW (Wortsman et al. 2023, AdamW-Adafactor): AdamW whose step size is clipped per tensor.

For each tensor, RMS = sqrt(mean(g^2 / max(v_hat, eps^2))) and the step uses lr / max(1, RMS), so a gradient
much larger than its running second moment cannot throw the weights far; this replaces gradient clipping.
We use torch-optimi's implementation. Its semantics, read from optimi 0.3.3:
- Adam's bias correction is folded into the betas (debiased betas), which gives Adam's update exactly;
  the denominator is sqrt(v_hat) + eps.
- Weight decay is decoupled and shrinks by the clipped lr: w *= 1 - lr_t * wd. With `decouple_lr=True`
  ("fully decoupled", as ModernBERT) it is w *= 1 - (lr_t / max_lr) * wd, so `weight_decay` is the
  per-step decay at peak lr (1e-5 in ModernBERT's recipe) and follows the schedule's multiplier.
  `max_lr` defaults to the `lr` the optimizer is built with, which the Composer schedulers multiply.
- `kahan_sum=None` turns Kahan-compensated updates on for bf16/fp16 parameters (pure low-precision
  training); fp32 master weights under autocast need none.
- Its update runs in Triton kernels (CUDA) or a per-tensor loop; the `foreach` path is deprecated and
  setting `foreach` at all would turn the Triton choice off, so it stays unset.
- Sharded parameters (FSDP2's DTensors) take our own per-tensor loop, the same math, see `_sharded_step`.
"""

from collections.abc import Iterable

import optimi
import torch
from optimi.utils import HAS_TRITON, debias_beta
from torch import nn
from torch.distributed.tensor import DTensor

from modernbert_train.optim.param_groups import NO_DECAY_CATEGORIES, param_groups


class StableAdamW(optimi.StableAdamW):
    """optimi's StableAdamW, choosing its Triton kernels only for parameter groups that live on a GPU, and
    stepping FSDP2-sharded parameters with the RMS of the whole tensor.

    optimi 0.3.3 makes the Triton choice (`triton=None`) from a still empty list, so it picks Triton for CPU
    tensors too whenever Triton imports, and the step fails. We choose at the first step instead, after
    the Trainer has moved the model to its device. Its kernels read raw pointers, which a DTensor has not.
    A step with no gradients at all is skipped whole: moments and step count stay as they were.
    """

    def step(self, closure=None, param=None):
        if param is not None:
            return super().step(closure, param)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if all(p.grad is None for group in self.param_groups for p in group["params"]):
            # No gradient at all (the non-finite guard dropped a bad batch's): no step. optimi would still
            # count one, which shifts the bias correction of every later step.
            return loss
        sharded = any(isinstance(p, DTensor) for group in self.param_groups for p in group["params"])
        for group in self.param_groups:
            if group["triton"] is None:
                on_gpu = all(p.is_cuda for p in group["params"]) and torch.cuda.is_bf16_supported()
                group["triton"] = HAS_TRITON and on_gpu and not sharded
        if not sharded:
            super().step()
            return loss
        for group in self.param_groups:
            self._sharded_step(group)
        return loss

    @torch.no_grad()
    def _sharded_step(self, group: dict) -> None:
        """optimi 0.3.3's per-tensor update (`_single_param_stableadamw`), but with the mean of g^2 / v_hat
        taken as a sum over the shards divided by the whole tensor's size: optimi's `.mean()` of a DTensor
        all-reduces with AVG, which gloo lacks (and which averages unequal shards' means as if equal)."""
        params, grads, exp_avgs, exp_avg_sqs, eps_sqs, kahan_comps = [], [], [], [], [], []
        self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, eps_sqs, kahan_comps, mean_squares=[])
        group["step"].add_(1)
        step = group["step"].item()
        beta1_comp = 1 - debias_beta(group["beta1"], step)
        beta2_hat = debias_beta(group["beta2"], step)
        for param, grad, exp_avg, exp_avg_sq, eps_sq, kahan_comp in zip(
            params, grads, exp_avgs, exp_avg_sqs, eps_sqs, kahan_comps
        ):
            exp_avg.lerp_(grad, weight=beta1_comp)
            exp_avg_sq.mul_(beta2_hat).addcmul_(grad, grad, value=1 - beta2_hat)
            square_sum = grad.pow(2).div_(exp_avg_sq.maximum(eps_sq)).sum()
            if isinstance(square_sum, DTensor):
                square_sum = square_sum.full_tensor()  # a SUM all-reduce over the shards
            # The clipped lr stays a device tensor: reading the RMS on the host would sync once per tensor.
            lr = group["lr"] / (square_sum / grad.numel()).sqrt().clamp(min=1.0)
            if group["weight_decay"] != 0:
                scale = lr / group["max_lr"] if group["decouple_lr"] else lr
                param.mul_(1 - scale * group["weight_decay"])
            update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"]) * -lr
            if group["kahan_sum"] and param.dtype in (torch.float16, torch.bfloat16):
                # Add the step to the carried rounding error, then keep what bf16 could not hold.
                kahan_comp.add_(update)
                before = param.detach().clone()
                param.add_(kahan_comp)
                kahan_comp.add_(before.sub_(param))
            else:
                param.add_(update)


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    weight_decay: float = 1e-5,
    decouple_lr: bool = True,
    no_decay: str | Iterable[str] = NO_DECAY_CATEGORIES,
    kahan_sum: bool | None = None,
    triton: bool | None = None,
) -> StableAdamW:
    """StableAdamW over `model`'s trainable parameters, without weight decay on the `no_decay` categories.

    Defaults are ModernBERT's recipe (lr 8e-4 base / 5e-4 large). `no_decay` is a comma-separated string
    or list drawn from 'norms', 'biases', 'embeddings'; ModernBERT itself decayed embeddings
    (`no_decay='norms,biases'`).
    """
    betas = tuple(betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"optimizer betas={list(betas)}: expected two values in [0, 1), e.g. [0.9, 0.98]")
    if lr <= 0:
        raise ValueError(f"optimizer lr={lr}: must be positive")
    if weight_decay < 0:
        raise ValueError(f"optimizer weight_decay={weight_decay}: must be >= 0")
    if eps < 0:
        raise ValueError(f"optimizer eps={eps}: must be >= 0")
    return StableAdamW(
        param_groups(model, weight_decay, no_decay),
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        decouple_lr=decouple_lr,
        kahan_sum=kahan_sum,
        triton=triton,
    )
