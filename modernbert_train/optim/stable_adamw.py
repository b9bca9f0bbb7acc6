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
- Its update runs in Triton kernels (CUDA) or a per-tensor loop; its `foreach` path is deprecated (and reads
  every tensor's RMS back to the host), and setting `foreach` at all would turn the Triton choice off, so
  it stays unset. Our own multi-tensor step (`impl="foreach"`, see `StableAdamW._multi_tensor_step`) does
  the same math; sharded parameters (FSDP2's DTensors) always take it.
"""

import functools
import logging
from collections.abc import Iterable

import optimi
import torch
from optimi.utils import HAS_TRITON, debias_beta
from torch import nn
from torch.distributed.tensor import DTensor, Partial

from modernbert_train.optim.param_groups import NO_DECAY_CATEGORIES, param_groups

IMPLS = ("auto", "optimi", "foreach")
log = logging.getLogger(__name__)


class StableAdamW(optimi.StableAdamW):
    """optimi's StableAdamW, with the update run by one of two implementations (`impl`):

    - `optimi`: optimi's own step: its Triton kernels on a GPU (two launches per tensor from Python, about
      29 us each: base's 137 tensors take an 8 ms host span for 2.2 ms of kernels, measured on an H200),
      its per-tensor loop on a CPU. optimi 0.3.3 makes the Triton choice (`triton=None`) from a still empty
      list, so it picks Triton for CPU tensors too whenever Triton imports, and the step fails: the choice
      is made here at each step, from where the parameters are.
    - `foreach`: ours, `_multi_tensor_step`: the same math in multi-tensor (`torch._foreach_*`) ops, about
      twenty launches per group whatever its number of tensors, with no value read back to the host. It
      steps FSDP2-sharded parameters (DTensors) with the RMS of the whole tensor, for every tensor of a
      group in one all-reduce. Kernels read raw pointers, which a DTensor has not, so sharded parameters
      always take it.
    - `foreach` with `compile=True`: the same step in two compiled halves (moments and each tensor's RMS sum;
      then the weights), each one fused pass over the state where the multi-tensor ops make about ten;
      groups holding Kahan-compensated tensors stay eager (compiled code keeps bf16 intermediates in fp32,
      which compensation cannot survive). Compiling costs its first steps (seconds on a CPU).
    - `auto`: `foreach` for sharded parameters and on a GPU, else (a CPU) `optimi`. On a GPU a Composer batch
      under optimi must read the non-finite guard's verdict before the step, and its launch span then
      idles the device (8 ms for base on an H200), where `foreach` takes the verdict on the device and
      its few launches hide behind the backward's kernels (`bench_gpu --compare-optimizers` times both:
      `ratio_composer`).

    The state is optimi's in both (exp_avg, exp_avg_sq, eps_sq, kahan_comp per tensor; step per group), so a
    checkpoint resumes under either. A step with no gradients at all is skipped whole: moments and step count
    stay as they were. Under `foreach` the gradients are used as scratch (as optimi's own foreach path does):
    read them before the step.

    A step can also be skipped by a flag still on the device (`skip_next_step_if`, the non-finite guard's
    verdict), so that nobody waits for the backward to end before the step is launched: `foreach` then takes
    a masked step (non-finite gradients are zeroed, and a skipped step moves no weight, moment or Kahan
    compensation), counts it, and `settle_skip` takes the count back once the host reads the flag (after the
    batch, when Composer has read its loss and the device is idle anyway). optimi's kernels take no mask: for
    it the flag is read at the step. A state_dict is never taken with a skip unsettled.
    """

    def __init__(
        self, params, *args, impl: str = "auto", triton: bool | None = None, compile: bool = False, **kwargs
    ):
        if impl not in IMPLS:
            raise ValueError(f"optimizer impl={impl!r}: choose from {', '.join(IMPLS)}")
        if compile and impl == "optimi":
            raise ValueError("optimizer compile=True compiles the foreach step, not optimi's: use impl auto")
        super().__init__(params, *args, triton=triton, **kwargs)
        self.impl = impl
        self.compile = compile  # the foreach step's two halves through torch.compile (_compiled_halves)
        self._warned_eager = False
        self.triton = triton  # under optimi: None chooses by device at each step
        self._skip_next: torch.Tensor | None = None  # skip_next_step_if's flag, for the next step
        self._unsettled: torch.Tensor | None = None  # the flag of a masked step already counted

    def _sharded(self) -> bool:
        return any(isinstance(p, DTensor) for group in self.param_groups for p in group["params"])

    def _takes_foreach(self) -> bool:
        if self.impl != "auto" or self.compile:
            return self.impl != "optimi"
        return self._sharded() or any(p.is_cuda for group in self.param_groups for p in group["params"])

    def skips_on_device(self) -> bool:
        """Whether a step skipped by `skip_next_step_if` needs no host read before it (the `foreach` step)."""
        return self._takes_foreach()

    def skip_next_step_if(self, flag: torch.Tensor) -> None:
        """Skip the next step when `flag` (a boolean scalar, on the device) is true: weights, moments and step
        count stay as they were. Under `foreach` nothing is read back to the host for it before the step;
        call `settle_skip` after it."""
        self._skip_next = flag.detach().reshape(())

    def settle_skip(self) -> bool | None:
        """Whether the last step skipped by a device flag was skipped (None: none is unsettled). Reads the
        flag (a sync, free once the device is idle) and takes a skipped step's count back."""
        flag, self._unsettled = self._unsettled, None
        if flag is None:
            return None
        skipped = bool(flag)
        if skipped:
            for group in self.param_groups:
                group["step"].sub_(1)
        return skipped

    def state_dict(self):
        self.settle_skip()
        return super().state_dict()

    def step(self, closure=None, param=None):
        if param is not None:
            return super().step(closure, param)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.settle_skip()  # the previous step's, where nobody settled it
        skip, self._skip_next = self._skip_next, None
        if all(p.grad is None for group in self.param_groups for p in group["params"]):
            # No gradient at all (the non-finite guard dropped a bad batch's): no step. optimi would still
            # count one, which shifts the bias correction of every later step.
            return loss
        sharded = self._sharded()
        if sharded and self.impl == "optimi":
            raise ValueError("optimizer impl='optimi' cannot step FSDP-sharded parameters; use auto")
        if self._takes_foreach():
            for group in self.param_groups:
                self._multi_tensor_step(group, skip)
            self._unsettled = skip
            return loss
        if skip is not None and bool(skip):  # optimi's kernels take no mask: read here
            return loss
        for group in self.param_groups:
            on_gpu = all(p.is_cuda for p in group["params"]) and torch.cuda.is_bf16_supported()
            # Decided at every step, not only when unset: a checkpoint saved on a CPU (or under foreach)
            # carries triton=False in its param groups, and optimi's loop reads a value back per tensor.
            group["triton"] = HAS_TRITON and on_gpu if self.triton is None else self.triton
            if group["triton"]:
                self._triton_scratch(group)
        super().step()
        return loss

    def _triton_scratch(self, group: dict) -> None:
        """What optimi's Triton kernels read beside the moments, for a state created by another path."""
        for p in group["params"]:
            state = self.state.get(p)
            if not state or "kahan_comp" not in state:
                continue  # created by optimi at this step
            if "mean_square" not in state:
                state["mean_square"] = torch.zeros(1, dtype=torch.float32, device=p.device)
            if state["kahan_comp"] is None:
                state["kahan_comp"] = torch.zeros(1, dtype=torch.uint8, device=p.device)

    @torch.no_grad()
    def _multi_tensor_step(self, group: dict, skip: torch.Tensor | None = None) -> None:
        """optimi 0.3.3's update (`_single_param_stableadamw`) over a whole group in multi-tensor ops. The
        clipped learning rate stays a device tensor per parameter (optimi reads each RMS back to the host: a
        sync per tensor on a GPU). The mean of g^2 / v_hat is each tensor's sum over its shards (one
        all-reduce for the group) divided by the whole tensor's size: a DTensor's `.mean()` all-reduces with
        AVG, which gloo lacks, and averages unequal shards' means as if equal.

        With `skip` (a device boolean) the step is masked: the gradients are zeroed where it is true (a bad
        batch's may be non-finite), and every factor that would move a moment or a weight is multiplied by
        `go` (0 or 1), which costs one more pass over the gradients and one over the first moments."""
        group["triton"] = False  # our state needs no Triton scratch (optimi's path adds it when it runs)
        params, grads, exp_avgs, exp_avg_sqs, eps_sqs, kahan_comps = [], [], [], [], [], []
        self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, eps_sqs, kahan_comps, mean_squares=[])
        if not params:
            return
        group["step"].add_(1)  # a host tensor: no sync
        step = int(group["step"])
        beta1_comp = 1 - debias_beta(group["beta1"], step)
        beta2_hat = debias_beta(group["beta2"], step)
        local = [_local(p) for p in params]
        grads = [_local(g) for g in grads]
        exp_avgs = [_local(m) for m in exp_avgs]
        exp_avg_sqs = [_local(v) for v in exp_avg_sqs]
        compensated = [
            group["kahan_sum"] and p.dtype in (torch.float16, torch.bfloat16) and k is not None
            and k.numel() == p.numel()
            for p, k in zip(params, kahan_comps)
        ]  # fmt: skip
        if self.compile and any(compensated) and not self._warned_eager:
            self._warned_eager = True
            log.warning(
                "optimizer.compile: a parameter group holds Kahan-compensated (bf16) weights; it is "
                "stepped eager (compiled code keeps bf16 intermediates in fp32: compensation would not hold)"
            )
        if self.compile and not any(compensated):
            self._compiled_step(
                group, params, local, grads, exp_avgs, exp_avg_sqs, beta1_comp, beta2_hat, skip
            )
            return

        go = None
        if skip is None:
            torch._foreach_lerp_(exp_avgs, grads, beta1_comp)
            torch._foreach_mul_(exp_avg_sqs, beta2_hat)
        else:
            skip = skip.to(exp_avgs[0].device)
            go = (~skip).to(torch.float32)
            for grad in grads:
                grad.masked_fill_(skip, 0.0)
            # lerp as m * (1 - w) + w * g, w masked (a zero gradient would still pull m towards 0)
            torch._foreach_mul_(exp_avgs, 1 - beta1_comp * go)
            torch._foreach_add_(exp_avgs, grads, alpha=beta1_comp)
            torch._foreach_mul_(exp_avg_sqs, 1 - (1 - beta2_hat) * go)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2_hat)
        # Each tensor's RMS of g / sqrt(max(v_hat, eps^2)), the gradients as scratch.
        torch._foreach_mul_(grads, grads)
        torch._foreach_div_(grads, torch._foreach_clamp_min(exp_avg_sqs, group["eps"] ** 2))
        # A skipped step's lrs are 0: no decay, and the step's denominators become inf, so m moves no weight.
        lrs = _clipped_lrs(group, _sums(grads), params, go)
        if group["weight_decay"] != 0:
            torch._foreach_mul_(local, list((1 - lrs * _decay_scale(group)).unbind(0)))
        # The step m / (sqrt(v) + eps) * lr as m / ((sqrt(v) + eps) / lr), in the gradients' memory.
        torch._foreach_copy_(grads, exp_avg_sqs)
        torch._foreach_sqrt_(grads)
        torch._foreach_add_(grads, group["eps"])
        torch._foreach_div_(grads, list(lrs.unbind(0)))
        # Kahan-compensated (`compensated`): low-precision tensors with a compensation buffer (a Triton
        # state's 1-element placeholder is none).
        kahan = [i for i, yes in enumerate(compensated) if yes]
        plain = [i for i, yes in enumerate(compensated) if not yes]
        if plain:
            pick = lambda items: [items[i] for i in plain]  # noqa: E731
            torch._foreach_addcdiv_(pick(local), pick(exp_avgs), pick(grads), value=-1.0)
        if kahan:
            # Add the step to the carried rounding error, then keep what bf16 could not hold.
            pick = lambda items: [items[i] for i in kahan]  # noqa: E731
            compensations = [_local(k) for k in pick(kahan_comps)]
            torch._foreach_addcdiv_(compensations, pick(exp_avgs), pick(grads), value=-1.0)
            before = torch._foreach_add(pick(local), 0.0)  # a copy
            # Skipped: the pending compensation stays pending (added, the weight would round anew).
            pending = compensations if go is None else torch._foreach_mul(compensations, go)
            torch._foreach_add_(pick(local), pending)
            torch._foreach_sub_(before, pick(local))
            torch._foreach_add_(compensations, before)

    def _compiled_step(
        self, group, params, local, grads, exp_avgs, exp_avg_sqs, beta1_comp, beta2_hat, skip
    ) -> None:  # fmt: skip
        """`_multi_tensor_step`'s math in two compiled halves. The scalars that change every step travel as
        a device tensor (a Python float would be compiled in as a constant: a recompile per step), made by
        fills, not by a copy from the host (which would wait for the stream)."""
        moments_and_sums, update_weights = _compiled_halves()
        device = local[0].device
        go = (~skip.to(device)).to(torch.float32) if skip is not None else torch.ones((), device=device)
        values = (beta1_comp, beta2_hat, group["eps"] ** 2)
        scalars = torch.stack([*(torch.full((), v, device=device) for v in values), go])
        sums = moments_and_sums(grads, exp_avgs, exp_avg_sqs, scalars, skip is not None)
        lrs = _clipped_lrs(group, sums, params, go)
        update_weights(local, exp_avgs, exp_avg_sqs, lrs, torch.stack(
            [torch.full((), _decay_scale(group), device=device), torch.full((), group["eps"], device=device)]
        ))  # fmt: skip


def _clipped_lrs(group: dict, sums: torch.Tensor, params: list, go: torch.Tensor | None) -> torch.Tensor:
    """Each tensor's learning rate, lr / max(1, RMS), from its sum of g^2 / max(v_hat, eps^2) on this rank
    (summed over the shards here), on the device; times `go` (0 for a skipped step)."""
    sums = _sum_over_shards(sums, params)
    mean_squares = torch._foreach_div(list(sums.unbind(0)), [p.numel() for p in params])
    lrs = group["lr"] / torch.stack(mean_squares).sqrt().clamp(min=1.0)
    return lrs if go is None else lrs * go


def _decay_scale(group: dict) -> float:
    """The weight decay per unit of lr: weight_decay / max_lr when fully decoupled (`decouple_lr`)."""
    if group["weight_decay"] == 0:
        return 0.0
    return group["weight_decay"] / group["max_lr"] if group["decouple_lr"] else group["weight_decay"]


def _moments_and_sums(grads, exp_avgs, exp_avg_sqs, scalars: torch.Tensor, masked: bool) -> torch.Tensor:
    """The compiled step's first half: each tensor's moments in place, and its sum of g^2 / max(v, eps^2)
    (the RMS's square times its size), in fp32. `scalars`: (1 - debiased beta1, debiased beta2, eps^2, go),
    go 0 when the step is skipped (`masked`: gradients may be non-finite, and every factor is masked)."""
    beta1_comp, beta2_hat, eps_sq, go = scalars.unbind(0)
    sums = []
    for grad, exp_avg, exp_avg_sq in zip(grads, exp_avgs, exp_avg_sqs):
        g = grad.float()
        if masked:
            g = torch.where(go > 0, g, 0.0)
            m = exp_avg.float() * (1 - beta1_comp * go) + beta1_comp * g
            v = exp_avg_sq.float() * (1 - (1 - beta2_hat) * go) + (1 - beta2_hat) * g * g
        else:
            m = torch.lerp(exp_avg.float(), g, beta1_comp)
            v = exp_avg_sq.float() * beta2_hat + (1 - beta2_hat) * g * g
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        sums.append((g * g / v.clamp_min(eps_sq)).sum())
    return torch.stack(sums)


def _update_weights(params, exp_avgs, exp_avg_sqs, lrs: torch.Tensor, scalars: torch.Tensor) -> None:
    """The compiled step's second half: w = w (1 - lr_i decay) - lr_i m / (sqrt(v) + eps), with each tensor's
    clipped lr (0 for a skipped step). `scalars`: (decay, eps)."""
    decay, eps = scalars.unbind(0)
    for i, (weight, exp_avg, exp_avg_sq) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
        lr = lrs[i]
        step = lr * exp_avg.float() / (exp_avg_sq.float().sqrt() + eps)
        weight.copy_(weight.float() * (1 - lr * decay) - step)


@functools.cache
def _compiled_halves():
    """Both halves through torch.compile, made at first use. Lists of a group's tensors: one graph per group
    (and per masked or not), stable from step to step, as the scalars are tensors."""
    return (
        torch.compile(_moments_and_sums, fullgraph=True, dynamic=False),
        torch.compile(_update_weights, fullgraph=True, dynamic=False),
    )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _sums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each (non-negative) tensor's sum in fp32, stacked. On a GPU one multi-tensor reduction (the L1 norm);
    a CPU's norm kernel sums less exactly (0.27% low over 38M elements), so there each is summed."""
    if tensors[0].is_cuda:
        return torch.stack(torch._foreach_norm(tensors, 1, dtype=torch.float32))
    return torch.stack([t.sum(dtype=torch.float32) for t in tensors])


def _sum_over_shards(sums: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The whole tensors' sums from this rank's shards' sums: one all-reduce per (mesh, placements) layout
    among the group's DTensors (FSDP2 gives them one), over the mesh dimensions they are sharded on."""
    layouts: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if isinstance(p, DTensor):
            layouts.setdefault((p.device_mesh, tuple(p.placements)), []).append(i)
    if not layouts:
        return sums
    whole = list(sums.unbind(0))
    for (mesh, placements), indices in layouts.items():
        partial = [Partial() if placement.is_shard() else placement for placement in placements]
        # Picked out by views and one stack: an index tensor made on the host would be a copy to the device
        # that waits for the stream.
        mine = sums if len(indices) == len(whole) else torch.stack([whole[i] for i in indices])
        reduced = DTensor.from_local(mine, mesh, partial, run_check=False).full_tensor()
        for position, i in enumerate(indices):
            whole[i] = reduced[position]
    return torch.stack(whole)


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
    impl: str = "auto",
    compile: bool = False,
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
        impl=impl,
        compile=compile,
    )
