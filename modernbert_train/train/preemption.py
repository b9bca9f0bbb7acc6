"""SIGTERM (a preemption notice) saves a checkpoint at the end of the current batch, then stops training."""

import logging
import signal

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler

log = logging.getLogger(__name__)


class SaveOnSigterm(Callback):
    """Use `save_interval` as the Trainer's `save_interval`: the regular interval, or now after a SIGTERM.

    The handler only sets a flag (installed at INIT, after Composer's own handler that exits at once); the
    checkpoint saver asks `save_interval` at the end of each batch, and training stops after the save.
    """

    def __init__(self, interval: str):
        self.regular = create_interval_scheduler(interval)
        self.requested = False

    def init(self, state: State, logger: Logger) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: saving a checkpoint after this batch, then stopping")
        self.requested = True

    def save_interval(self, state: State, event: Event) -> bool:
        if self.requested and event in (Event.BATCH_CHECKPOINT, Event.FIT_END):
            return True
        return self.regular(state, event)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.requested:
            state.stop_training()
