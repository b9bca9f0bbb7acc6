"""A Composer logger destination that appends one JSON object per logged step to a metrics.jsonl file."""

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from composer.core import Callback, Event, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import create_interval_scheduler, dist

from modernbert_train import storage

# Composer logs these counters at the start of a batch, before the batch counts; the row's own `batch`,
# `samples` and `tokens` are taken after it.
_PRE_BATCH_COUNTERS = (
    "time/epoch",
    "time/batch",
    "time/sample",
    "time/batch_in_epoch",
    "time/sample_in_epoch",
    "time/token",
    "time/token_in_epoch",
)
# Composer's evaluators log `metrics/<label>/<metric>`: an evaluation's row is written whatever the log
# interval, since an eval_interval off it (25ba against 10ba, or in tok or dur) would otherwise lose it.
_EVAL_METRICS = "metrics/"


class JSONLLogger(LoggerDestination):
    """One row per logged optimizer step: `batch` (steps done), `samples`, `tokens`, `loss/train/total`, the
    learning rates, throughput, and the eval metrics when an eval ran after that step. Logged: every
    `log_every_n_batches`-th batch, the first, the last, and any with an evaluation or a non-finite value.

    A row gathers everything logged for one batch (its training step, then any eval after it) and is written
    at the batch's checkpoint event, before a checkpoint of that batch is saved: a run killed after a save
    has every row up to the checkpoint it resumes from. Until SpeedMonitor's window fills, throughput is the
    average since the run started. Rank 0 writes; rows are appended across restarts, and a resumed run first
    drops the rows a killed run wrote past the checkpoint it resumes from (a run starting at batch 0 drops
    them all), so each batch has one row. An unrelated earlier run's file never reaches here: train/start.py
    refuses it, or deletes it under save_overwrite.
    JSON has no NaN or infinity: such a value is written as the string "nan", "inf" or "-inf" (which
    `float()` reads back) and its key listed in the row's `non_finite`.

    A URI `path` (a run in a bucket) is written to a local copy, fetched at the start and uploaded at every
    checkpoint and at the end (then deleted): a crash loses at most the rows since the last checkpoint. Once
    `lock_lost` (the run lock's `lost()`) says why the bucket folder may be another run's, nothing more is
    uploaded.
    """

    def __init__(
        self,
        path: str | Path,
        log_every_n_batches: int = 1,
        save_interval: str = "1ep",
        lock_lost: Callable[[], str | None] = lambda: None,
    ):
        self.remote = str(path) if storage.is_uri(path) else None
        self.lock_lost = lock_lost
        # The checkpoint saver's schedule, asked separately: True exactly at the batches it saves.
        self.checkpoint_due = create_interval_scheduler(save_interval)
        self.path = (
            Path(tempfile.mkdtemp(prefix="modernbert-metrics-"), "metrics.jsonl")
            if self.remote
            else Path(path)
        )
        self.every = max(1, log_every_n_batches)
        self.row: dict[str, float] = {}
        self.average_throughput: dict[str, float] = {}
        self.final = False
        self.batch_in_progress = 0  # the batch being trained (counted from 1), its clock not yet advanced

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if key not in _PRE_BATCH_COUNTERS:
                self.row[key] = float(value.item() if hasattr(value, "item") else value)

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.remote and dist.get_global_rank() == 0 and storage.exists(self.remote):
            storage.download_file(self.remote, self.path)
        resumed_at = state.timestamp.batch.value
        # Rows past the start are a killed attempt's (at 0: one killed before its first checkpoint).
        if dist.get_global_rank() == 0 and self.path.is_file():
            self._drop_rows_after(resumed_at)

    def batch_start(self, state: State, logger: Logger) -> None:
        self._flush()
        self.batch_in_progress = state.timestamp.batch.value + 1

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._flush()  # done already by `writer_before_save()` when the run lists it
        if self.checkpoint_due(state, Event.BATCH_CHECKPOINT):
            self._upload()

    def writer_before_save(self) -> Callback:
        """A callback to list before the checkpoint saver. At an event's end Composer runs loggers after the
        other callbacks, so this logger alone would write the batch's row after its checkpoint is saved,
        and a kill between the two would lose the row."""
        return _WriteRow(self)

    def batch_end(self, state: State, logger: Logger) -> None:
        now = state.timestamp
        self.row.update(batch=now.batch.value, samples=now.sample.value, tokens=now.token.value)
        seconds = now.total_wct.total_seconds()
        if seconds > 0:
            self.average_throughput = {
                "throughput/tokens_per_sec": now.token.value / seconds,
                "throughput/samples_per_sec": now.sample.value / seconds,
            }
        self.final = state.get_elapsed_duration() is not None and state.get_elapsed_duration() >= 1.0

    def fit_end(self, state: State, logger: Logger) -> None:
        self.final = True
        self._flush()

    def close(self, state: State, logger: Logger) -> None:
        if self.row and all(key.startswith(_EVAL_METRICS) for key in self.row):
            # The evaluation Composer runs after FIT_END when the last batch was off eval_interval: its
            # metrics join the last batch's row, written before its checkpoint.
            self._add_to_last_row(state.timestamp.batch.value)
        if "batch" not in self.row and self.row:
            # The batch that stopped the run before its end (the non-finite guard, before or after the clock
            # moved on): its row still goes in.
            self.row["batch"] = self.batch_in_progress
            self.final = True
        self._flush()
        self._upload()
        if self.remote:
            # The local copy is uploaded; a long campaign of bucket runs would otherwise fill the node's /tmp.
            shutil.rmtree(self.path.parent, ignore_errors=True)

    def _upload(self) -> None:
        if self.lock_lost() is not None:
            return
        if self.remote and dist.get_global_rank() == 0 and self.path.is_file():
            # One plain PUT: no transfer threads, so it also works from Composer's close at interpreter exit.
            storage.write_bytes(self.remote, self.path.read_bytes())

    def _add_to_last_row(self, batch: int) -> None:
        row, self.row = self.row, {}
        if dist.get_global_rank() != 0 or not self.path.is_file() or self.lock_lost() is not None:
            return
        lines = self.path.read_text().splitlines(keepends=True)
        try:
            last = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            return
        if last.get("batch") != batch:
            return
        last.update({k: v if math.isfinite(v) else str(v) for k, v in row.items()})
        non_finite = [k for k, v in row.items() if not math.isfinite(v)]
        if non_finite:
            last["non_finite"] = last.get("non_finite", []) + non_finite
        staged = self.path.with_name(self.path.name + ".tmp")
        staged.write_text("".join(lines[:-1]) + json.dumps(last) + "\n")
        staged.replace(self.path)

    def _drop_rows_after(self, batch: int) -> None:
        lines = self.path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                row_batch = json.loads(line).get("batch", 0)
            except (json.JSONDecodeError, AttributeError):
                continue  # a row cut short by the kill
            if row_batch <= batch:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) == len(lines):
            return
        staged = self.path.with_name(self.path.name + ".tmp")
        staged.write_text("".join(kept))
        staged.replace(self.path)

    def _flush(self) -> None:
        row, self.row = self.row, {}
        non_finite = [k for k, v in row.items() if not math.isfinite(v)]
        if (
            dist.get_global_rank() != 0
            or "batch" not in row
            or ("loss/train/total" not in row and not non_finite)
        ):
            return
        evaluated = any(key.startswith(_EVAL_METRICS) for key in row)
        if row["batch"] % self.every and row["batch"] != 1 and not (self.final or non_finite or evaluated):
            return  # off the log interval; a row with a non-finite value or an evaluation is always written
        for key, value in self.average_throughput.items():
            row.setdefault(key, value)
        ordered = {
            "batch": row.pop("batch"),
            **{k: v if math.isfinite(v) else str(v) for k, v in row.items()},
        }
        if non_finite:
            ordered["non_finite"] = non_finite
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(ordered) + "\n")


class _WriteRow(Callback):
    def __init__(self, destination: JSONLLogger):
        self.destination = destination

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self.destination._flush()
