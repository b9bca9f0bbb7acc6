"""Tells the training dataset which batch is about to be trained on: checkpoints resume the exact stream."""

from composer.core import Callback, State
from composer.loggers import Logger


class ObserveDataState(Callback):
    """At AFTER_DATALOADER hands the batch to `dataset.observe`, which pops its `pack_state`.

    Composer then saves `dataset.state_dict()` in each checkpoint and restores it with `load_state_dict`.
    """

    def after_dataloader(self, state: State, logger: Logger) -> None:
        dataset = getattr(state.train_dataloader, "dataset", None)
        if hasattr(dataset, "observe"):
            dataset.observe(state.batch)
