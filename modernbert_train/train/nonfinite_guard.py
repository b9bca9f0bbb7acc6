"""Skips the optimizer step of a batch whose loss or gradient is not finite; stops a run that keeps making
them. Logs the gradient norm of every batch, computed over FSDP2's shards as well as whole gradients, before
the gradients are clipped (grad_clip_norm), which is done here, with that norm."""

import logging
import math

import torch
from composer.core import Callback, Precision, State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.tensor import DTensor

from modernbert_train.optim.stable_adamw import StableAdamW

log = logging.getLogger(__name__)


class NonFiniteStop(Exception):
    """Too many non-finite batches in a row; the message is one line."""


def grad_norm(parameters: list[torch.nn.Parameter], foreach: bool | None = None) -> torch.Tensor:
    """The L2 norm of all gradients, the same value on every rank. A sharded gradient (DTensor) adds its
    local shard's squares, summed over the ranks; a whole gradient (one process, DDP) is the same on every
    rank and is counted once. Every rank must call this (it all-reduces).

    On a GPU (`foreach` None) the per-tensor norms come from multi-tensor kernels (fp32 accumulation whatever
    the gradient's dtype): a loop launches ~3 small kernels per tensor, ~400 per step for base, on the host's
    critical path just before the optimizer step. A CPU has no launches to save, and its norm kernel sums
    less exactly (base's 38M-element embedding gradient: 0.27% low, where pow(2).sum() is exact to 1e-7),
    so there the loop stays."""
    device = parameters[0].device
    foreach = device.type == "cuda" if foreach is None else foreach
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = _sum_of_squares([g.to_local() for g in grads if isinstance(g, DTensor)], device, foreach)
    if dist.get_world_size() > 1:
        dist.all_reduce(sharded)  # SUM
    whole = _sum_of_squares([g for g in grads if not isinstance(g, DTensor)], device, foreach)
    return (sharded + whole).sqrt()


def clip_gradients(parameters: list[torch.nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    """Scale every gradient by min(1, max_norm / norm) (torch's clip_grad_norm_ rule), on the device: `norm`
    is `grad_norm`'s, so nothing is read back. A sharded gradient is scaled in its local shard."""
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    grads = [
        p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in parameters if p.grad is not None
    ]
    if grads and grads[0].device.type == "cuda":
        torch._foreach_mul_(grads, scale)
    else:
        for grad in grads:
            grad.mul_(scale)


def _sum_of_squares(tensors: list[torch.Tensor], device: torch.device, foreach: bool) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    if tensors and foreach:
        return total + torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().sum()
    for tensor in tensors:
        total += tensor.float().pow(2).sum()
    return total


class NonFiniteGuard(Callback):
    """A batch with a non-finite loss on any rank, or a non-finite gradient, takes no optimizer step: the
    optimizer keeps weights, moments and step count, while the clock and the schedule move on.
    `max_in_a_row` such batches in a row stop the run with `NonFiniteStop`, before the last one's
    checkpoint: the latest checkpoint stays the last good one.

    The verdict is made on the device. Where the optimizer can skip a step by a flag still there
    (StableAdamW's `foreach` step: `optimizer.impl` auto on a GPU or for FSDP-sharded weights, or foreach),
    it is handed over as such, and read at the batch's end, where Composer has read the batch's loss and
    the device is idle anyway: nothing waits for the backward before the optimizer step is launched, so its
    launches overlap the backward's kernels. Otherwise (optimi's kernels take no mask) it is read before the
    step, and a bad batch's gradients are dropped (ours skips a step with no gradients).

    Under amp_fp16 the loss scaler owns gradient overflow (it skips those steps itself and lowers the
    scale), so there only the loss is checked.

    With `clip_norm` (grad_clip_norm) the gradients are then clipped to that global norm, with the norm just
    measured: the logged `train/grad_norm` is the gradient's own, not the clipped one's (Composer's
    GradientClipping algorithm ran before this callback, which saw only norms capped at clip_norm). Under
    amp_fp16 the scaler unscales the gradients first, so the clip is of the true gradient.
    """

    def __init__(self, max_in_a_row: int, clip_norm: float | None = None):
        if max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_batches={max_in_a_row}: must be >= 1")
        self.max_in_a_row = max_in_a_row
        self.clip_norm = clip_norm
        self.in_a_row = 0
        self.skipped = 0
        # This batch's non-finite micro-batch losses on this rank, counted where the losses are: a host
        # tensor copied to the GPU would be a copy that waits for the forward to end.
        self._bad_loss: torch.Tensor | None = None
        self._metrics: dict[str, float] = {}
        # The optimizer given the verdict unread, and [gradient norm, bad losses] to read at the batch's end.
        self._unread: tuple[StableAdamW, torch.Tensor] | None = None

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self._bad_loss = None

    def after_loss(self, state: State, logger: Logger) -> None:
        losses = state.loss.values() if isinstance(state.loss, dict) else [state.loss]
        for loss in losses:
            bad = (~torch.isfinite(loss.detach())).sum()  # kept on the device: read once per batch
            self._bad_loss = bad if self._bad_loss is None else self._bad_loss + bad

    def after_train_batch(self, state: State, logger: Logger) -> None:
        parameters = [p for p in state.model.parameters() if p.requires_grad]
        if self.clip_norm is not None and state.precision == Precision.AMP_FP16 and state.scaler is not None:
            for optimizer in state.optimizers:
                state.scaler.unscale_(optimizer)  # its step then knows they are unscaled
        norm = grad_norm(parameters)
        if self.clip_norm is not None:
            clip_gradients(parameters, norm, self.clip_norm)  # a non-finite batch's step is skipped anyway
        if self._bad_loss is None:
            bad_loss = torch.zeros((), dtype=torch.float32, device=norm.device)
        else:
            bad_loss = self._bad_loss.to(norm.device, torch.float32)
        if dist.get_world_size() > 1:
            dist.all_reduce(bad_loss)  # a loss that is bad on any rank is bad everywhere
        values = torch.stack([norm, bad_loss])
        optimizer = state.optimizers[0] if len(state.optimizers) == 1 else None
        if isinstance(optimizer, StableAdamW) and optimizer.skips_on_device():
            bad = bad_loss > 0
            if state.precision != Precision.AMP_FP16:
                bad |= ~torch.isfinite(norm)
            optimizer.skip_next_step_if(bad)
            self._unread = (optimizer, values)
            return
        norm_value, bad_loss_count = values.tolist()
        batch = int(state.timestamp.batch) + 1  # the clock advances after the optimizer step
        if self._judge(state, logger, batch, norm_value, bad_loss_count, loss_logged=False):
            for param in parameters:
                param.grad = None

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._unread is not None:
            (optimizer, values), self._unread = self._unread, None
            norm_value, bad_loss_count = values.tolist()
            optimizer.settle_skip()  # the same verdict: takes a skipped step's count back
            # The clock already names this batch, and Composer has logged its loss.
            batch = int(state.timestamp.batch)
            self._judge(state, logger, batch, norm_value, bad_loss_count, loss_logged=True)
        # Logged here, where the clock already names this batch.
        logger.log_metrics(self._metrics)

    def _judge(
        self, state: State, logger: Logger, batch: int, norm_value: float, bad_loss_count: float,
        loss_logged: bool,
    ) -> bool:  # fmt: skip
        """Counts the batch as good or bad (its step skipped), from its gradient norm and its ranks' count of
        non-finite losses; stops the run after `max_in_a_row` bad ones. Whether the batch is bad."""
        bad_grad = state.precision != Precision.AMP_FP16 and not math.isfinite(norm_value)
        self._metrics = {"train/grad_norm": norm_value, "train/skipped_steps": self.skipped}
        if not (bad_loss_count or bad_grad):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.skipped += 1
        self._metrics["train/skipped_steps"] = self.skipped
        what = "loss" if bad_loss_count else "gradient"
        log.warning(
            "batch %d: non-finite %s (gradient norm %s): optimizer step skipped (%d in a row, limit %d)",
            batch, what, norm_value, self.in_a_row, self.max_in_a_row,
        )  # fmt: skip
        if self.in_a_row >= self.max_in_a_row:
            if not loss_logged:
                # Composer logs a batch's loss only after this event: the stopping batch's row gets it here.
                loss = (
                    float("nan")
                    if bad_loss_count
                    else float(state.total_loss_dict.get("loss/train/total", 0))
                )
                logger.log_metrics({"loss/train/total": loss})
            logger.log_metrics(self._metrics)
            raise NonFiniteStop(
                f"{self.in_a_row} batches in a row (the last: batch {batch}) had a non-finite loss or "
                f"gradient (max_nonfinite_batches={self.max_in_a_row}); stopped: the latest checkpoint "
                "is the last good one"
            )
        return True
