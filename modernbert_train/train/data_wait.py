"""How long the trainer waits for data, and how full the packed batches are, logged for every batch.

- `time/data_wait`: seconds from asking the loader for a batch to having it;
- `time/data_wait_fraction`: that wait as a share of the batch's whole step (wait + train);
- `data/packing_efficiency`: the share of the batch's token slots that hold tokens (not padding).

Every `window` batches a warning names a wait above 5% of the step time: streaming from a bucket with a
cache too small or too few loader workers shows up here rather than as unexplained low throughput.
"""

import logging
import time

from composer.core import Callback, State
from composer.loggers import Logger

log = logging.getLogger(__name__)

WARN_FRACTION = 0.05


class DataWaitMonitor(Callback):
    def __init__(self, window: int = 50):
        self.window = window
        self.asked = 0.0
        self.received = 0.0
        self.packing: float | None = None
        self.waited = 0.0
        self.stepped = 0.0
        self.batches = 0

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self.asked = time.perf_counter()

    def after_dataloader(self, state: State, logger: Logger) -> None:
        self.received = time.perf_counter()
        mask = state.batch.get("attention_mask") if isinstance(state.batch, dict) else None
        self.packing = float(mask.sum()) / mask.numel() if mask is not None and mask.numel() else None

    def batch_end(self, state: State, logger: Logger) -> None:
        # Logged with the batch's step: metrics logged before BATCH_START would not reach its row.
        wait, step = self.received - self.asked, time.perf_counter() - self.asked
        metrics = {"time/data_wait": wait, "time/data_wait_fraction": wait / step if step > 0 else 0.0}
        if self.packing is not None:
            metrics["data/packing_efficiency"] = self.packing
        logger.log_metrics(metrics)
        self.waited += wait
        self.stepped += step
        self.batches += 1
        if self.batches == self.window:
            if self.stepped > 0 and self.waited / self.stepped > WARN_FRACTION:
                log.warning(
                    "waiting for data took %.0f%% of the step time over the last %d batches (%.3f s per "
                    "batch): raise data.num_workers, or for remote streams use a local cache on fast disk "
                    "with room for the shards in flight",
                    100 * self.waited / self.stepped,
                    self.batches,
                    self.waited / self.batches,
                )
            self.waited = self.stepped = 0.0
            self.batches = 0
