"""SIGTERM (a preemption notice) saves a checkpoint at the end of the current batch, then stops training.

The command then exits with EXIT_PREEMPTED (75, sysexits' "temporary failure: retry") once the checkpoint
is saved, and exports nothing: a scheduler can tell a preempted run (requeue the same command) from a
completed one (0) and a failed one (1). Without a save_folder nothing can be saved: the run stops after the
batch and exits with EXIT_TERMINATED (143, as a process killed by SIGTERM reports).

With several ranks, a scheduler signals them with some skew, or only some of them: the ranks agree on the
flag at each batch's checkpoint (an all-reduce MAX), so that all of them save the same checkpoint and stop
together, rather than one saving (a collective) while the others train on into the next batch's.

A scheduler may signal every process of the job (SLURM) or its process group, DataLoader workers included:
they ignore a SIGTERM that is not their rank's (`_heed_sigterm_from_rank_only`), and the rank stops them.

A run that lost its bucket run lock (train/run_lock.py: another run holds the save_folder now, or may) stops
the same way but saves nothing: no checkpoint, no export, and the metrics logger uploads no more rows. It
exits with EXIT_LOCK_LOST (1: a failure; rerunning it would meet the other run). Only rank 0 holds the lock:
its loss travels in the same agreement, and outranks a SIGTERM. It is asked once more after training, before
the export (`check_lock`).
"""

import functools
import logging
import os
import signal
import threading
from collections.abc import Callable

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_LOCK_LOST = 1

# The ranks' flags, agreed by their maximum.
_GO_ON, _SIGTERM, _LOCK_LOST = 0, 1, 2


class SaveOnSigterm(Callback):
    """Use `save_interval` as the Trainer's `save_interval`: the regular interval, or now after a SIGTERM, or
    never again once the run lock is lost.

    The handler only sets this rank's flag (installed at INIT, after Composer's own handler that exits at
    once); at each batch's BATCH_CHECKPOINT the ranks agree on it and on `lock_lost` (rank 0's run lock's
    `lost()`) in `_stop_now`, whichever of this callback and the checkpoint saver asks first (every rank runs
    the callbacks in the same order), the checkpoint saver asks `save_interval`, and training stops after the
    save, or without one when the lock is lost.
    """

    def __init__(self, interval: str, saves: bool, lock_lost: Callable[[], str | None] = lambda: None):
        self.regular = create_interval_scheduler(interval)
        self.saves = saves
        self.lock_lost = lock_lost
        self.requested = False  # this rank got SIGTERM
        self.agreed = False  # some rank got SIGTERM or lost the lock by a batch's checkpoint: all stop there
        self.agreed_at: int | None = None  # the batch whose checkpoint `agreed` was decided at
        self.lost: str | None = None  # why the run lock is lost, once the ranks agreed it is (one line)
        self.stopped_early = False

    def init(self, state: State, logger: Logger) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def fit_start(self, state: State, logger: Logger) -> None:
        # For the workers forked from now on (each iteration forks its own).
        loaders = [state.train_dataloader] + [
            evaluator.dataloader.dataloader for evaluator in state.evaluators
        ]
        for loader in loaders:
            if isinstance(loader, DataLoader) and loader.num_workers > 0:
                loader.worker_init_fn = functools.partial(_heed_sigterm_from_rank_only, loader.worker_init_fn)

    def _on_sigterm(self, signum, frame) -> None:
        if self.agreed or self.requested:
            # Already stopping: Composer's launcher passes its own SIGTERM on to the ranks, which a scheduler
            # may have signalled too, and signals the ranks still closing (see post_close).
            return
        if self.saves:
            log.warning("SIGTERM: saving a checkpoint after this batch, then stopping")
        else:
            log.warning("SIGTERM: stopping after this batch; no save_folder, so no checkpoint is saved")
        self.requested = True

    def _stop_now(self, state: State) -> bool:
        """Whether any rank has got SIGTERM or lost the lock, decided once per batch and the same on every
        rank."""
        batch = state.timestamp.batch.value
        if self.agreed or self.agreed_at == batch:
            return self.agreed
        self.agreed_at = batch
        flag = self._agree(state, _SIGTERM if self.requested else _GO_ON)
        self.agreed = flag != _GO_ON
        if flag == _SIGTERM and not self.requested:
            log.warning("SIGTERM on another rank: saving a checkpoint after this batch, then stopping")
        return self.agreed

    def _agree(self, state: State, flag: int) -> int:
        """The ranks' highest flag, this rank's `flag` or _LOCK_LOST where its lock is lost; sets `lost`."""
        why = self.lock_lost()
        if why is not None:
            flag = _LOCK_LOST
        if dist.get_world_size() > 1:
            # One tiny collective per batch, on the backend's device (cuda for nccl, cpu for gloo).
            tensor = state.device.tensor_to_device(torch.tensor([flag], dtype=torch.int32))
            dist.all_reduce(tensor, reduce_operation="MAX")
            flag = int(tensor.item())
        if flag == _LOCK_LOST and self.lost is None:
            self.lost = why or "rank 0 lost the save_folder's run lock"
        return flag

    def save_interval(self, state: State, event: Event) -> bool:
        if event == Event.BATCH_CHECKPOINT:
            self._stop_now(state)
        if self.lost is not None:
            return False  # the save_folder may be another run's now
        if self.agreed and event in (Event.BATCH_CHECKPOINT, Event.FIT_END):
            return True
        return self.regular(state, event)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self._stop_now(state) and not self.stopped_early:
            # Asked before stopping: stop_training() makes the current batch max_duration.
            self.stopped_early = (state.get_elapsed_duration() or 0) < 1
            state.stop_training()

    def check_lock(self, state: State) -> None:
        """Once more after training (and its uploads), before the export: the lock may have been lost since
        the last batch's checkpoint. Every rank calls it (the ranks agree)."""
        if self.lost is None:
            self._agree(state, _GO_ON)

    def post_close(self) -> None:
        if self.stopped_early or self.lost is not None:
            # Every rank exits with the same code now, but once one has exited non-zero Composer's launcher
            # SIGTERMs those still running, and Python restores SIGTERM's default action (death by signal,
            # which the launcher would report instead of this code) as the interpreter shuts down: ignored.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def exit_code(self) -> int:
        """0 when training reached max_duration (a SIGTERM in its last batch changes nothing), else why it
        stopped."""
        if self.lost is not None:
            return EXIT_LOCK_LOST
        if not self.stopped_early:
            return 0
        return EXIT_PREEMPTED if self.saves else EXIT_TERMINATED


def _heed_sigterm_from_rank_only(worker_init_fn: Callable[[int], None] | None, worker_id: int) -> None:
    """A DataLoader worker's start: a SIGTERM from anyone but its rank is ignored; one from its rank (ending
    a worker that did not stop when asked) ends it, as torch's own handler does. A scheduler signals every
    process of a job (SLURM) or its process group, and torch's handler died of it: the rank then failed on
    the lost worker instead of saving, and the other ranks waited for it in their next collective. SIGTERM
    is blocked in the worker (its later threads inherit that) and taken by one thread that sees who sent
    it."""
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True).start()
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def _end_on_sigterm_from(rank_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != rank_pid:
        pass
    os._exit(0)
