"""How a run starts, decided once before the Trainer is built.

- resume: autoresume finds this run's own newest whole checkpoint below max_duration (load_path is then
  ignored); damaged or incomplete newer ones are reported and moved aside;
- complete: that checkpoint already reached max_duration: rerunning the command has nothing to do;
- phase change: load_path with reset_time: another run's weights and moments, this recipe's clock;
- load: load_path without reset_time: the checkpoint's clock goes on;
- fresh: none of these.

Rank 0 reads the files and broadcasts its answer, so all ranks start the same way, or all exit.
"""

import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from composer.core import Time
from composer.utils import dist, get_device

from modernbert_train import storage
from modernbert_train.train.checkpoint import CLOCK_COUNTERS, CheckpointError, checkpoint_clock
from modernbert_train.train.checkpoint_files import checkpoint_order, newest_good_checkpoint
from modernbert_train.train.schema import TrainConfig


class StartKind(Enum):
    FRESH = "fresh"
    RESUME = "resume"
    COMPLETE = "complete"
    PHASE_CHANGE = "phase change"
    LOAD = "load"


@dataclass(frozen=True)
class RunStart:
    kind: StartKind
    checkpoint: str | None = None  # the checkpoint Composer loads (or, when complete, the finished one)
    elapsed: Time | None = None  # its training time in max_duration's unit, where it was read

    @property
    def reset_time(self) -> bool:
        return self.kind is StartKind.PHASE_CHANGE

    def completion_message(self, config: TrainConfig) -> str:
        return (
            f"modernbert-train: run '{config.run_name}' is complete: its latest checkpoint {self.checkpoint} "
            f"is at {self.elapsed}, max_duration is {config.max_duration}; nothing to do"
        )


def decide_start(config: TrainConfig) -> RunStart:
    """How this run starts; the same answer on every rank. Raises a one-line CheckpointError."""
    if dist.get_world_size() == 1:
        return _decide(config)
    # The Trainer would initialize the process group with these same arguments, and reuses this one.
    dist.initialize_dist(get_device(None), config.dist_timeout)
    decision: list[RunStart | CheckpointError | None] = [None]
    if dist.get_global_rank() == 0:
        try:
            decision[0] = _decide(config)
        except CheckpointError as e:  # every rank reports it, rather than waiting for rank 0
            decision[0] = e
    dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], CheckpointError):
        raise decision[0]
    return decision[0]


def _decide(config: TrainConfig) -> RunStart:
    if not config.autoresume:
        checkpoint = None
    elif storage.is_uri(config.save_folder):
        checkpoint = _latest_remote_checkpoint(config.save_folder)
    else:
        checkpoint = _newest_good_checkpoint(config.save_folder)
    if checkpoint is not None:
        elapsed = _elapsed(checkpoint, config.max_duration)
        kind = StartKind.COMPLETE if _reached(elapsed, config.max_duration) else StartKind.RESUME
        return RunStart(kind, str(checkpoint), elapsed)
    if not config.load_path:
        return RunStart(StartKind.FRESH)
    if config.reset_time:
        return RunStart(StartKind.PHASE_CHANGE, config.load_path)
    if config.load_weights_only:  # the checkpoint's clock is not loaded
        return RunStart(StartKind.LOAD, config.load_path)
    elapsed = _elapsed(config.load_path, config.max_duration)
    if _reached(elapsed, config.max_duration):
        raise CheckpointError(
            f"load_path: checkpoint {config.load_path} is already at {elapsed} and max_duration is "
            f"{config.max_duration}, so nothing would train; a new phase needs reset_time=true"
        )
    return RunStart(StartKind.LOAD, config.load_path, elapsed)


def _newest_good_checkpoint(save_folder: str) -> Path | None:
    """The checkpoint autoresume continues from (`latest-rank0.pt` is pointed at it); the damaged or
    incomplete ones newer than it are reported and moved aside."""
    folder = Path(save_folder)
    if not folder.is_dir():
        return None
    checkpoint, skipped = newest_good_checkpoint(folder)
    for skip in skipped:
        print(f"modernbert-train: skipped {folder / skip.name}: {skip.reason}", file=sys.stderr)
    if checkpoint is None and any(checkpoint_order(Path(skip.name)) for skip in skipped):
        raise CheckpointError(
            f"save_folder {folder} has checkpoints but none is whole (see above); move them away to start "
            "over"
        )
    return checkpoint


def _latest_remote_checkpoint(save_folder: str) -> str | None:
    """The newest checkpoint in a bucket's save folder. An object appears whole or not at all, so every
    listed one is complete; Composer's `latest` link there is uploaded up to half a minute after it."""
    names = [name for name in storage.list_files(save_folder) if checkpoint_order(Path(name))]
    newest = max(names, key=lambda name: checkpoint_order(Path(name)), default=None)
    return storage.join(save_folder, newest) if newest else None


def _elapsed(checkpoint: str | Path, max_duration: str) -> Time | None:
    """The checkpoint's training time in max_duration's unit; None for a unit the clock does not count."""
    unit = Time.from_timestring(max_duration).unit
    counter = unit.name.lower()
    if counter not in CLOCK_COUNTERS:
        return None
    try:
        with storage.local_file(checkpoint) as local:  # a bucket's checkpoint is fetched whole to read it
            return Time(checkpoint_clock(local)[counter], unit)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {checkpoint}") from None


def _reached(elapsed: Time | None, max_duration: str) -> bool:
    """Composer's own test for 'no training would occur'."""
    return elapsed is not None and elapsed >= Time.from_timestring(max_duration)
