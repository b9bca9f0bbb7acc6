"""How a run starts, decided once before the Trainer is built.

- resume: autoresume finds this run's own newest whole checkpoint below max_duration (load_path is then
  ignored), a file or a sharded folder, locally or in a bucket; damaged or incomplete newer ones are
  reported and moved aside;
- complete: that checkpoint already reached max_duration: rerunning the command has nothing to do;
- phase change: load_path with reset_time: another run's weights and moments, this recipe's clock;
- load: load_path without reset_time: the checkpoint's clock goes on;
- fresh: none of these.

A resume or a load continues the checkpoint's optimizer, data stream and RNG: a recipe that changed one of
the keys those fix is refused here (train/recipe_changes.py rules which), and so is one whose schedule
would give another lr at the batch it goes on from (unless allow_schedule_change).

A resume and a clock-continuing load also continue the W&B run the checkpoint logged to; the other starts get
a new one.

Rank 0 reads the files and broadcasts its answer, so all ranks start the same way, or all exit. On several
nodes every rank then checks that it sees the save folder rank 0 read (a node-local disk is refused).
"""

import copy
import dataclasses
import math
import pickle
import secrets
import socket
import sys
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from composer.core import Time
from composer.utils import dist, get_device

from modernbert_train import storage
from modernbert_train.train.checkpoint import (
    CLOCK_COUNTERS,
    CheckpointError,
    CheckpointSummary,
    checkpoint_summary,
    sharded_metadata,
    sharded_summary_files,
    why_incomplete_sharded,
    why_not_loadable,
)
from modernbert_train.train.checkpoint_files import (
    checkpoint_order,
    is_run_entry,
    newest_good_checkpoint,
    sha256,
)
from modernbert_train.train.config import to_dict
from modernbert_train.train.data import masking_rate_at
from modernbert_train.train.recipe_changes import recipe_changes, refusal, show_value
from modernbert_train.train.schedulers import multiplier_at
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
    # A resume's, load's or phase change's checkpoint: the identity of the tokenizer it was trained with
    # (`tokenizer_identity`), where it records the tokenizer
    tokenizer_identity: str | None = None
    # and the W&B run it logged to, which this run continues (None: a new one)
    wandb_run_id: str | None = None
    # What an earlier run left in save_folder, which save_overwrite deletes before training (names in it)
    earlier_run: tuple[str, ...] = ()

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
    decision: list[RunStart | Exception | None] = [None]
    if dist.get_global_rank() == 0:
        try:
            decision[0] = _decide(config)
        except Exception as e:
            # Every rank raises it (a bad checkpoint, or the bucket failing mid-look), rather than waiting
            # for rank 0 until dist_timeout.
            decision[0] = e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], Exception):
        raise decision[0]
    _check_folder_shared(config.save_folder)
    return decision[0]


def _check_folder_shared(save_folder: str | None) -> None:
    """On several nodes a local save_folder must be one folder that every node sees (a network file system):
    the checkpoints rank 0 writes are read back by every node on resume, and a sharded checkpoint is one
    folder of every rank's files. A node-local disk under the same path trains, then fails or splits its
    checkpoints; so rank 0 writes a probe file there, every rank looks for it, and each rank raises the same
    one-line CheckpointError naming the nodes that do not see it. Every rank calls it (collectives)."""
    if not save_folder or storage.is_uri(save_folder) or dist.get_world_size() == dist.get_local_world_size():
        return
    probe = [None]
    if dist.get_global_rank() == 0:
        name = f".node-probe-{secrets.token_hex(8)}"
        try:
            Path(save_folder).mkdir(parents=True, exist_ok=True)
            Path(save_folder, name).touch()
            probe[0] = name
        except OSError as e:
            probe[0] = CheckpointError(f"save_folder {save_folder} cannot be written: {e.strerror}")
    dist.broadcast_object_list(probe, src=0)
    if isinstance(probe[0], Exception):
        raise probe[0]
    seen = Path(save_folder, probe[0]).is_file()
    views = dist.all_gather_object((dist.get_node_rank(), socket.gethostname(), seen))
    if dist.get_global_rank() == 0:
        Path(save_folder, probe[0]).unlink(missing_ok=True)
    blind = sorted({(node, host) for node, host, saw in views if not saw})
    if blind:
        nodes = ", ".join(f"node {node} ({host})" for node, host in blind)
        raise CheckpointError(
            f"save_folder {save_folder} is not shared by the nodes: {nodes} cannot see the file node 0 wrote "
            "there (a node-local disk?); on several nodes save_folder must be one folder all of them mount "
            "(a network file system) or a bucket (s3://...)"
        )


def _picklable(error: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return False
    return True


def _decide(config: TrainConfig) -> RunStart:
    start = _choose(config)
    if start.checkpoint is not None and start.kind is not StartKind.COMPLETE:
        fsdp = config.parallelism.fsdp
        problem = why_not_loadable(start.checkpoint, fsdp.state_dict_type if fsdp else None)
        if problem is not None:
            raise CheckpointError(problem)
    if start.kind in (StartKind.FRESH, StartKind.LOAD, StartKind.PHASE_CHANGE) and not config.autoresume:
        start = dataclasses.replace(start, earlier_run=_earlier_run(config))
    return start


def _earlier_run(config: TrainConfig) -> tuple[str, ...]:
    """What an earlier run left in save_folder (its checkpoints and metrics.jsonl: a local folder's entries,
    a bucket's objects). A run that does not resume would mix its own with them (a later autoresume could
    even continue the earlier run's newer checkpoint): refused, unless save_overwrite, which deletes them
    (`replace_earlier_run`) once the whole recipe has been checked and the Trainer built."""
    if not config.save_folder:
        return ()
    folder = config.save_folder
    if storage.is_uri(folder):
        names = [name for name in storage.list_files(folder) if is_run_entry(name.split("/")[0])]
    else:
        local = Path(folder)
        names = [p.name for p in local.iterdir() if is_run_entry(p.name)] if local.is_dir() else []
    entries = sorted({name.split("/")[0] for name in names})
    if entries and not config.save_overwrite:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise CheckpointError(
            f"save_folder {storage.display(folder)} holds an earlier run ({shown}); autoresume=true "
            "continues it, save_overwrite=true deletes it first, or choose another save_folder"
        )
    return tuple(sorted(names))


def replace_earlier_run(config: TrainConfig, start: RunStart) -> None:
    """save_overwrite: delete the earlier run `decide_start` found in save_folder (rank 0, once nothing can
    refuse the recipe any more: a typo must not cost the earlier run)."""
    if not start.earlier_run:
        return
    folder = config.save_folder
    try:
        for name in start.earlier_run:
            storage.remove(storage.join(folder, name))
    except (OSError, storage.StorageError) as e:
        raise CheckpointError(f"save_overwrite: cannot delete the earlier run in {folder}: {e}") from None
    entries = {name.split("/")[0] for name in start.earlier_run}
    print(
        f"modernbert-train: save_overwrite: deleted the earlier run's {len(entries)} checkpoint and metrics "
        f"entries in {storage.display(folder)}",
        file=sys.stderr,
    )


def _choose(config: TrainConfig) -> RunStart:
    if not config.autoresume:
        checkpoint = None
    elif storage.is_uri(config.save_folder):
        checkpoint, summary = _latest_remote_checkpoint(config.save_folder)
    else:
        checkpoint = _newest_good_checkpoint(config.save_folder)
        summary = _summary(checkpoint) if checkpoint is not None else None
    if checkpoint is not None:
        elapsed = _elapsed(summary, config.max_duration)
        if _reached(elapsed, config.max_duration):  # nothing trains: the recipe's other keys do not matter
            return RunStart(StartKind.COMPLETE, str(checkpoint), elapsed)
        _check_recipe(summary, config, str(checkpoint), load=False)
        _check_schedule(summary, config, str(checkpoint))
        _check_masking(summary, config, str(checkpoint))
        return RunStart(
            StartKind.RESUME, str(checkpoint), elapsed, summary.tokenizer_identity, summary.wandb_run_id
        )
    if not config.load_path:
        return RunStart(StartKind.FRESH)
    load_path, summary = _checkpoint_to_load(config.load_path)
    if config.reset_time:
        # The clock and recipe start anew; the weights (so the tokenizer they were trained with) carry over.
        summary = summary or _summary(load_path)
        return RunStart(StartKind.PHASE_CHANGE, load_path, tokenizer_identity=summary.tokenizer_identity)
    if config.load_weights_only:  # the checkpoint's clock is not loaded
        return RunStart(StartKind.LOAD, load_path)
    summary = summary or _summary(load_path)
    elapsed = _elapsed(summary, config.max_duration)
    if _reached(elapsed, config.max_duration):
        raise CheckpointError(
            f"load_path: checkpoint {load_path} is already at {elapsed} and max_duration is "
            f"{config.max_duration}, so nothing would train; a new phase needs reset_time=true"
        )
    _check_recipe(summary, config, load_path, load=True)
    _check_schedule(summary, config, load_path)
    _check_masking(summary, config, load_path)
    return RunStart(StartKind.LOAD, load_path, elapsed, summary.tokenizer_identity, summary.wandb_run_id)


def _checkpoint_to_load(load_path: str) -> tuple[str, CheckpointSummary | None]:
    """The checkpoint `load_path` names: itself (a file, or a sharded checkpoint's folder), or, for another
    run's save_folder, its newest whole checkpoint, as a resume of that run would pick it (so a pipeline's
    next phase loads the previous one's last checkpoint, in a bucket too, where no latest-rank0.pt is
    kept). With its summary where finding it read one."""
    if storage.is_uri(load_path):
        tops = {name.partition("/")[0] for name in storage.list_sizes(load_path)}
        if ".metadata" in tops or not any(checkpoint_order(Path(top)) for top in tops):
            return load_path, None  # a checkpoint file (it lists nothing under it), or a sharded one
        checkpoint, summary = _latest_remote_checkpoint(load_path)
    else:
        folder = Path(load_path)
        if not folder.is_dir() or (folder / ".metadata").is_file():
            return load_path, None
        checkpoint, summary = _newest_good_checkpoint(load_path), None
    if checkpoint is None:
        raise CheckpointError(f"load_path: save_folder {load_path} holds no whole checkpoint to load")
    print(
        f"modernbert-train: load_path {load_path}: loading its newest checkpoint {checkpoint}",
        file=sys.stderr,
    )
    return str(checkpoint), summary


def _check_recipe(summary: CheckpointSummary, config: TrainConfig, checkpoint: str, load: bool) -> None:
    """Refuse a recipe that changed a key the checkpoint fixes; report the data paths that moved."""
    if summary.recipe is None:  # saved before checkpoints kept their recipe: nothing to compare
        return
    refused, moved = recipe_changes(summary.recipe, to_dict(config))
    if refused:
        raise CheckpointError(refusal(refused, checkpoint, load))
    for change in moved:
        print(
            f"modernbert-train: {change}: continuing checkpoint {checkpoint} as the same data, moved",
            file=sys.stderr,
        )


def _check_schedule(summary: CheckpointSummary, config: TrainConfig, checkpoint: str) -> None:
    """Refuse a recipe whose schedule gives another lr than the checkpoint's at the batch the run goes on
    from: `max_duration` and `scheduler` are free keys, but a longer max_duration under a 'dur'-relative
    decay that had begun (or a new scheduler) would make the lr jump, silently. Allowed where the lr is the
    same there (a stable phase extended, a decay that starts later), or with allow_schedule_change."""
    saved = summary.recipe
    if saved is None or config.allow_schedule_change:
        return
    if not isinstance(saved.get("scheduler"), dict) or not isinstance(saved.get("max_duration"), str):
        return
    here = to_dict(config)["scheduler"]
    before = multiplier_at(saved["scheduler"], saved["max_duration"], summary.clock)
    after = multiplier_at(here, config.max_duration, summary.clock)
    if before is None or after is None:
        return
    compared = [("max_duration", saved["max_duration"], config.max_duration)] + [
        (f"scheduler.{name}", saved["scheduler"].get(name), value) for name, value in here.items()
    ]
    _refuse_a_jump(
        summary, checkpoint, before, after, compared, "schedule", "lr multiplier",
        "(a 'dur'-relative decay that has begun moves with max_duration), or set allow_schedule_change=true "
        "to change the lr there on purpose",
    )  # fmt: skip


def _check_masking(summary: CheckpointSummary, config: TrainConfig, checkpoint: str) -> None:
    """As `_check_schedule`, for the masking ratio: `data.mlm_probability` is free, but its 'dur' times move
    with max_duration, so a longer run (or a new schedule) could jump the ratio at the resumed batch."""
    saved = summary.recipe
    if saved is None or config.allow_schedule_change:
        return
    data = saved.get("data")
    if (
        not isinstance(data, dict)
        or "mlm_probability" not in data
        or not isinstance(saved.get("max_duration"), str)
    ):
        return
    before_config = copy.deepcopy(config)
    before_config.max_duration = saved["max_duration"]
    before_config.data.mlm_probability = data["mlm_probability"]
    try:
        before = masking_rate_at(before_config, summary.clock)
        after = masking_rate_at(config, summary.clock)
    except (ValueError, TypeError, KeyError):  # a schedule the data builder will report itself
        return
    compared = [
        ("max_duration", saved["max_duration"], config.max_duration),
        ("data.mlm_probability", data["mlm_probability"], config.data.mlm_probability),
    ]
    _refuse_a_jump(
        summary, checkpoint, before, after, compared, "masking schedule", "masking ratio",
        "(a 'dur' time moves with max_duration), or set allow_schedule_change=true to change it there on "
        "purpose",
    )  # fmt: skip


def _refuse_a_jump(
    summary: CheckpointSummary,
    checkpoint: str,
    before: float,
    after: float,
    compared: list[tuple[str, Any, Any]],
    what: str,
    quantity: str,
    way_on: str,
) -> None:
    """One line refusing a resume where `quantity` would jump from `before` (the checkpoint's recipe) to
    `after` (this one) at the resumed batch, naming the keys of `compared` ((key, there, here)) that
    changed; nothing when the two agree."""
    if math.isclose(before, after, rel_tol=1e-6, abs_tol=1e-9):
        return
    changes = [f"{key}={show_value(there)} there, {show_value(here)} here" for key, there, here in compared
               if there != here]  # fmt: skip
    raise CheckpointError(
        f"{what} changed since checkpoint {checkpoint}: {'; '.join(changes)}; at its batch "
        f"{summary.clock['batch']} the {quantity} was {before:.4g} and would jump to {after:.4g}: put them "
        f"back {way_on}"
    )


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


def _latest_remote_checkpoint(save_folder: str) -> tuple[str | None, CheckpointSummary | None]:
    """The newest whole checkpoint in a bucket's save folder, files and sharded folders alike (ordered by
    epoch and batch), from one listing. An object appears whole or not at all, so every listed file is
    complete; each is fetched (as reading its clock would) and checked against its uploaded checksum. A
    sharded folder is whole once its `.metadata` and every file it refers to are listed, each at least as
    long as it says (every rank uploads its own files, so a save cut short leaves some missing); only its
    `.metadata` and the file holding its clock are fetched. A damaged or incomplete one is reported and moved
    aside (`NAME.bad`, every object of a folder), newest first; one uploaded before its checksum, or before
    checksums were recorded, must at least read as a checkpoint. Returns the checkpoint and its summary (so it
    is not fetched again to read it)."""
    listing = storage.list_sizes(save_folder)
    _move_orphan_checksums(save_folder, {name.partition("/")[0] for name in listing})
    folders: dict[str, dict[str, int | None]] = {}
    for name, size in listing.items():
        top, slash, member = name.partition("/")
        if slash:
            folders.setdefault(top, {})[member] = size
    candidates = sorted(
        {top for top in (name.partition("/")[0] for name in listing) if checkpoint_order(Path(top))},
        key=lambda name: (checkpoint_order(Path(name)), name),
    )
    damaged = []
    for name in reversed(candidates):
        uri = storage.join(save_folder, name)
        recorded = f"{name}.sha256"
        if name in folders:
            summary, reason = _sharded_summary(uri, folders[name])
            # `.metadata` first: a move cut short leaves a folder that is still incomplete, moved next time.
            objects = [f"{name}/{member}" for member in sorted(folders[name], key=lambda m: m != ".metadata")]
        else:
            summary, reason = _file_summary(save_folder, name, recorded in listing)
            objects = [name]
        if reason is None:
            return uri, summary
        # Moved aside, as locally: the resumed run saves under this name again, and Composer refuses to
        # upload over an object that is there (save_overwrite is off when autoresuming); a folder's stale
        # files would also sit among the new ones.
        for moved in objects + [recorded] * (recorded in listing):
            target = storage.join(save_folder, moved.replace(name, f"{name}.bad", 1))
            try:
                storage.move(storage.join(save_folder, moved), target)
            except storage.StorageError:
                raise CheckpointError(
                    f"checkpoint {uri} {reason}; move it out of save_folder (the resumed run would save "
                    "under its name) and rerun"
                ) from None
        print(f"modernbert-train: skipped {uri}: {reason}; moved aside to {name}.bad", file=sys.stderr)
        damaged.append(uri)
    if damaged:
        raise CheckpointError(
            f"save_folder {save_folder} has checkpoints but none is whole (see above); delete or move "
            "them to start over"
        )
    return None, None


def _move_orphan_checksums(save_folder: str, tops: set[str]) -> None:
    """A checkpoint's `NAME.sha256` without the checkpoint (its own upload failed, or it was deleted by hand)
    is moved aside to `NAME.bad.sha256`: the resumed run saves NAME again, and Composer refuses to upload its
    checksum over an object that is there, at the end of the run, after the checkpoint went up beside the
    stale checksum."""
    for orphan in sorted(tops):
        name = orphan.removesuffix(".sha256")
        if name == orphan or name in tops or not checkpoint_order(Path(name)):
            continue
        storage.move(storage.join(save_folder, orphan), storage.join(save_folder, f"{name}.bad.sha256"))
        print(
            f"modernbert-train: moved {storage.join(save_folder, orphan)} aside to {name}.bad.sha256: the "
            "checksum of a checkpoint that is not there",
            file=sys.stderr,
        )


def _file_summary(save_folder: str, name: str, checksum: bool) -> tuple[CheckpointSummary | None, str | None]:
    """The checkpoint file `name` in a bucket's save folder, fetched: its summary, or why it cannot be used
    (its bytes do not match its uploaded `NAME.sha256`, where there is one, or it does not read as one)."""
    recorded = f"{name}.sha256"
    expected = storage.read_text(storage.join(save_folder, recorded)).split()[:1] if checksum else []
    with storage.local_file(storage.join(save_folder, name)) as local:
        if expected and expected[0] != sha256(local):
            return None, f"its bytes do not match the checksum in {recorded} (damaged)"
        try:
            return checkpoint_summary(local), None
        except CheckpointError:
            return None, "cannot be read (truncated or not a checkpoint)"


def _sharded_summary(uri: str, files: dict[str, int | None]) -> tuple[CheckpointSummary | None, str | None]:
    """A sharded checkpoint folder in a bucket holding `files` (from a listing: relative names -> sizes): its
    summary, or why it cannot be used (incomplete, or unreadable). Only its `.metadata` and the file(s) that
    hold the clock and run metadata are fetched, not every rank's shard."""
    if ".metadata" not in files:
        return None, why_incomplete_sharded(files, None)
    with tempfile.TemporaryDirectory(prefix="modernbert-checkpoint-") as staging:
        storage.download_file(storage.join(uri, ".metadata"), Path(staging, ".metadata"))
        try:
            metadata = sharded_metadata(staging)
        except CheckpointError:
            return None, "cannot be read (its .metadata is truncated or not a checkpoint's)"
        reason = why_incomplete_sharded(files, metadata)
        if reason is not None:
            return None, reason
        for name in sharded_summary_files(metadata):
            storage.download_file(storage.join(uri, name), Path(staging, name))
        try:
            return checkpoint_summary(staging), None
        except CheckpointError:
            return None, "cannot be read (truncated or not a checkpoint)"


def _summary(checkpoint: str | Path) -> CheckpointSummary:
    if storage.is_uri(checkpoint) and (files := storage.list_sizes(checkpoint)):  # a sharded folder
        summary, reason = _sharded_summary(str(checkpoint), files)
        if reason is not None:
            raise CheckpointError(f"checkpoint {checkpoint} {reason}")
        return summary
    try:
        # A bucket's checkpoint file is fetched whole to read it.
        with storage.local_file(checkpoint) as local:
            return checkpoint_summary(local)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {checkpoint}") from None


def _elapsed(summary: CheckpointSummary, max_duration: str) -> Time | None:
    """The checkpoint's training time in max_duration's unit; None for a unit the clock does not count."""
    unit = Time.from_timestring(max_duration).unit
    counter = unit.name.lower()
    return Time(summary.clock[counter], unit) if counter in CLOCK_COUNTERS else None


def _reached(elapsed: Time | None, max_duration: str) -> bool:
    """Composer's own test for 'no training would occur'."""
    return elapsed is not None and elapsed >= Time.from_timestring(max_duration)
