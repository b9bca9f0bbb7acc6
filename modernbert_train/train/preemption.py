"""SIGTERM (a preemption notice) saves a checkpoint at the end of the current batch, then stops training.

The command then exits with EXIT_PREEMPTED (75, sysexits' "temporary failure: retry") once the checkpoint
is saved, and exports nothing: a scheduler can tell a preempted run (requeue the same command) from a
completed one (0) and a failed one (1). Without a save_folder nothing can be saved: the run stops after the
batch and exits with EXIT_TERMINATED (143, as a process killed by SIGTERM reports).
"""

import logging
import signal

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
EXIT_TERMINATED = 128 + signal.SIGTERM


class SaveOnSigterm(Callback):
    """Use `save_interval` as the Trainer's `save_interval`: the regular interval, or now after a SIGTERM.

    The handler only sets a flag (installed at INIT, after Composer's own handler that exits at once); the
    checkpoint saver asks `save_interval` at the end of each batch, and training stops after the save.
    """

    def __init__(self, interval: str, saves: bool):
        self.regular = create_interval_scheduler(interval)
        self.saves = saves
        self.requested = False
        self.stopped_early = False

    def init(self, state: State, logger: Logger) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if self.saves:
            log.warning("SIGTERM: saving a checkpoint after this batch, then stopping")
        else:
            log.warning("SIGTERM: stopping after this batch; no save_folder, so no checkpoint is saved")
        self.requested = True

    def save_interval(self, state: State, event: Event) -> bool:
        if self.requested and event in (Event.BATCH_CHECKPOINT, Event.FIT_END):
            return True
        return self.regular(state, event)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.requested and not self.stopped_early:
            # Asked before stopping: stop_training() makes the current batch max_duration.
            self.stopped_early = (state.get_elapsed_duration() or 0) < 1
            state.stop_training()

    def exit_code(self) -> int:
        """0 when training reached max_duration (a SIGTERM in its last batch changes nothing), else why it
        stopped."""
        if not self.stopped_early:
            return 0
        return EXIT_PREEMPTED if self.saves else EXIT_TERMINATED
