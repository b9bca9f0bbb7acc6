"""`export.interval`: a transformers folder every N batches along the run, beside the final export.

Folders are named `<export.hf_dir>-ba<batch>` (runs/x/hf-ba2000, or the same under a URI): each loads with
`from_hf` or transformers, so checkpoints along the run can be evaluated or averaged without Composer.
"""

from collections.abc import Callable
from pathlib import Path

from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from modernbert_train.train.config import ConfigError
from modernbert_train.train.export import ExportTargetError, check_export_target, export_trainer_model


def interval_folder(hf_dir: str, batch: int) -> str:
    return f"{str(hf_dir).rstrip('/')}-ba{batch}"


class PeriodicExport(Callback):
    def __init__(
        self,
        model,
        every_batches: int,
        hf_dir: str,
        tokenizer_file: str | Path,
        lock_lost: Callable[[], str | None] = lambda: None,
    ):
        self.model = model  # the ModernBertMLM itself: state.model may be wrapped (DDP)
        self.every = every_batches
        self.hf_dir = hf_dir
        self.tokenizer_file = tokenizer_file
        self.lock_lost = lock_lost  # rank 0's run lock's lost(): the run stops at this batch's checkpoint

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if batch % self.every == 0:
            folder = interval_folder(self.hf_dir, batch)
            # Rank 0 looks at the folder and every rank hears its answer: a refusal stops them all, where
            # one rank raising alone would leave the others waiting in the gather below. A lost run lock skips
            # the export (train/preemption.py then stops the run).
            answer = [None, False]  # why the folder is refused; whether the run lock is lost
            if dist.get_global_rank() == 0:
                answer[1] = self.lock_lost() is not None
                try:
                    check_export_target(folder, overwrite=False)  # an earlier export of ours is replaced
                except ExportTargetError as error:
                    answer[0] = str(error)
            dist.broadcast_object_list(answer, src=0)
            refusal, lock_lost = answer
            if lock_lost:
                return
            if refusal is not None:
                raise ExportTargetError(refusal)
            # Every rank calls: gathering an FSDP model's full weights is collective; rank 0 writes.
            export_trainer_model(self.model, folder, self.tokenizer_file)


def periodic_export(
    interval: str,
    hf_dir: str | None,
    model,
    tokenizer_file: str | Path,
    lock_lost: Callable[[], str | None] = lambda: None,
) -> PeriodicExport:
    """The callback for `export.interval` (a batch count such as 500ba), checked against the recipe."""
    if not hf_dir:
        raise ConfigError("export.interval needs export.hf_dir (its folders are named <hf_dir>-ba<batch>)")
    try:
        every = Time.from_timestring(interval)
    except ValueError:
        every = None
    if every is None or every.unit != TimeUnit.BATCH or every.value < 1:
        raise ConfigError(f"export.interval={interval!r}: give a positive number of batches, e.g. 500ba")
    return PeriodicExport(model, int(every.value), hf_dir, tokenizer_file, lock_lost)
