"""`export.interval`: a transformers folder every N batches along the run, beside the final export.

Folders are named `<export.hf_dir>-ba<batch>` (runs/x/hf-ba2000, or the same under a URI): each loads with
`from_hf` or transformers, so checkpoints along the run can be evaluated or averaged without Composer.
"""

from pathlib import Path

from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from modernbert_train.train.config import ConfigError
from modernbert_train.train.export import ExportTargetError, check_export_target, export_trainer_model


def interval_folder(hf_dir: str, batch: int) -> str:
    return f"{str(hf_dir).rstrip('/')}-ba{batch}"


class PeriodicExport(Callback):
    def __init__(self, model, every_batches: int, hf_dir: str, tokenizer_file: str | Path):
        self.model = model  # the ModernBertMLM itself: state.model may be wrapped (DDP)
        self.every = every_batches
        self.hf_dir = hf_dir
        self.tokenizer_file = tokenizer_file

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if batch % self.every == 0:
            folder = interval_folder(self.hf_dir, batch)
            # Rank 0 looks at the folder and every rank hears its answer: a refusal stops them all, where
            # one rank raising alone would leave the others waiting in the gather below.
            refusal = [None]
            if dist.get_global_rank() == 0:
                try:
                    check_export_target(folder, overwrite=False)  # an earlier export of ours is replaced
                except ExportTargetError as error:
                    refusal = [str(error)]
            dist.broadcast_object_list(refusal, src=0)
            if refusal[0] is not None:
                raise ExportTargetError(refusal[0])
            # Every rank calls: gathering an FSDP model's full weights is collective; rank 0 writes.
            export_trainer_model(self.model, folder, self.tokenizer_file)


def periodic_export(interval: str, hf_dir: str | None, model, tokenizer_file: str | Path) -> PeriodicExport:
    """The callback for `export.interval` (a batch count such as 500ba), checked against the recipe."""
    if not hf_dir:
        raise ConfigError("export.interval needs export.hf_dir (its folders are named <hf_dir>-ba<batch>)")
    try:
        every = Time.from_timestring(interval)
    except ValueError:
        every = None
    if every is None or every.unit != TimeUnit.BATCH or every.value < 1:
        raise ConfigError(f"export.interval={interval!r}: give a positive number of batches, e.g. 500ba")
    return PeriodicExport(model, int(every.value), hf_dir, tokenizer_file)
