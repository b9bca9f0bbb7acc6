"""Tells the training dataset which batch is about to be trained on: checkpoints resume the exact stream."""

from composer.core import Callback, State
from composer.loggers import Logger


class ObserveDataState(Callback):
    """At AFTER_DATALOADER hands the batch to `dataset.observe`, which pops its `pack_state`; at BATCH_END
    logs the masking ratio the batch was made with (`data/mlm_probability`).

    Composer then saves `dataset.state_dict()` in each checkpoint and restores it with `load_state_dict`.
    """

    def after_dataloader(self, state: State, logger: Logger) -> None:
        dataset = getattr(state.train_dataloader, "dataset", None)
        if hasattr(dataset, "observe"):
            dataset.observe(state.batch)

    def batch_end(self, state: State, logger: Logger) -> None:
        # Logged with the batch's step: metrics logged before BATCH_START would not reach its row.
        ratio = getattr(getattr(state.train_dataloader, "dataset", None), "last_mlm_probability", None)
        if ratio is not None:
            logger.log_metrics({"data/mlm_probability": ratio})
