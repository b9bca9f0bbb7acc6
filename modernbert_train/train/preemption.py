"""SIGTERM (a preemption notice) saves a checkpoint at the end of the current batch, then stops training.

The command then exits with EXIT_PREEMPTED (75, sysexits' "temporary failure: retry") once the checkpoint
is saved, and exports nothing: a scheduler can tell a preempted run (requeue the same command) from a
completed one (0) and a failed one (1). Without a save_folder nothing can be saved: the run stops after the
batch and exits with EXIT_TERMINATED (143, as a process killed by SIGTERM reports).

With several ranks, a scheduler signals them with some skew, or only some of them: the ranks agree on the
flag at each batch's checkpoint (an all-reduce MAX), so that all of them save the same checkpoint and stop
together, rather than one saving (a collective) while the others train on into the next batch's.
"""

import logging
import signal

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
EXIT_TERMINATED = 128 + signal.SIGTERM


class SaveOnSigterm(Callback):
    """Use `save_interval` as the Trainer's `save_interval`: the regular interval, or now after a SIGTERM.

    The handler only sets this rank's flag (installed at INIT, after Composer's own handler that exits at
    once); at each batch's BATCH_CHECKPOINT the ranks agree on it (`_stop_now`, whichever of this callback and
    the checkpoint saver asks first; every rank runs the callbacks in the same order), the checkpoint saver
    asks `save_interval`, and training stops after the save.
    """

    def __init__(self, interval: str, saves: bool):
        self.regular = create_interval_scheduler(interval)
        self.saves = saves
        self.requested = False  # this rank got SIGTERM
        self.agreed = False  # some rank had got SIGTERM by a batch's checkpoint: all of them stop there
        self.agreed_at: int | None = None  # the batch whose checkpoint `agreed` was decided at
        self.stopped_early = False

    def init(self, state: State, logger: Logger) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if self.agreed:
            return  # already stopping: Composer's launcher signals the ranks still closing (see post_close)
        if self.saves:
            log.warning("SIGTERM: saving a checkpoint after this batch, then stopping")
        else:
            log.warning("SIGTERM: stopping after this batch; no save_folder, so no checkpoint is saved")
        self.requested = True

    def _stop_now(self, state: State) -> bool:
        """Whether any rank has got SIGTERM, decided once per batch and the same on every rank."""
        batch = state.timestamp.batch.value
        if self.agreed or self.agreed_at == batch:
            return self.agreed
        self.agreed_at = batch
        if dist.get_world_size() == 1:
            self.agreed = self.requested
            return self.agreed
        # One tiny collective per batch, on the backend's device (cuda for nccl, cpu for gloo).
        flag = state.device.tensor_to_device(torch.tensor([int(self.requested)], dtype=torch.int32))
        dist.all_reduce(flag, reduce_operation="MAX")
        self.agreed = bool(flag.item())
        if self.agreed and not self.requested:
            log.warning("SIGTERM on another rank: saving a checkpoint after this batch, then stopping")
        return self.agreed

    def save_interval(self, state: State, event: Event) -> bool:
        if event == Event.BATCH_CHECKPOINT and self._stop_now(state):
            return True
        if event == Event.FIT_END and self.agreed:
            return True
        return self.regular(state, event)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self._stop_now(state) and not self.stopped_early:
            # Asked before stopping: stop_training() makes the current batch max_duration.
            self.stopped_early = (state.get_elapsed_duration() or 0) < 1
            state.stop_training()

    def post_close(self) -> None:
        if self.stopped_early:
            # Every rank exits with the same code now, but once one has exited non-zero Composer's launcher
            # SIGTERMs those still running, and Python restores SIGTERM's default action (death by signal,
            # which the launcher would report instead of this code) as the interpreter shuts down: ignored.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def exit_code(self) -> int:
        """0 when training reached max_duration (a SIGTERM in its last batch changes nothing), else why it
        stopped."""
        if not self.stopped_early:
            return 0
        return EXIT_PREEMPTED if self.saves else EXIT_TERMINATED
