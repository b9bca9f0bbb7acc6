"""Checkpoint files that are either complete or absent, and the choice of the newest good one on resume.

A whole (unsharded) checkpoint is written under a hidden temporary name, its SHA-256 recorded beside it
(`NAME.sha256`, in `sha256sum` format so `sha256sum -c` checks it by hand), and only then renamed to its final
name: a kill or a full disk mid-save leaves no file under a checkpoint's name. In a bucket the checkpoint and
its checksum are uploaded as two objects (an object appears whole or not at all). A sharded checkpoint is a
torch.distributed.checkpoint folder, complete once its `.metadata` exists (written last); its checksums, one
line per file, go to `FOLDER.sha256` once the save is done. On resume the newest checkpoint whose bytes
match its checksums is taken; the others newer than it are moved aside (`NAME.bad`), which also keeps them
out of the way of Composer's check for files a resumed run would overwrite.

`save_num_checkpoints_to_keep` holds across restarts (Composer counts only the checkpoints its own process
saved): once a checkpoint is complete (locally: written with its checksums; in a bucket: every file
uploaded), rank 0 lists the save folder and deletes the run's checkpoints beyond the newest N, an earlier
attempt's included (`checkpoints_to_delete` picks them).
"""

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from composer.callbacks import CheckpointSaver
from composer.core import State
from composer.loggers import Logger
from composer.utils import checkpoint, dist, parse_uri, reproducibility
from composer.utils.remote_uploader import RemoteFilesExistingCheckStatus

from modernbert_train import storage

log = logging.getLogger(__name__)

LATEST = "latest-rank0.pt"
METRICS = "metrics.jsonl"  # written by train/jsonl_logger.py
# Composer's default checkpoint names: `ep{epoch}-ba{batch}-rank0.pt` files, or folders `ep{epoch}-ba{batch}`
# of a sharded (FSDP) checkpoint.
_CHECKPOINT_NAME = re.compile(r"^ep(\d+)-ba(\d+)(-rank0\.pt)?$")
_PARTIAL_SUFFIX = ".partial"
# A full disk, a quota, a read-only mount or folder: the user can fix these and rerun the same command.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message is one line naming the folder and what it needs."""


def checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def partial_file(path: Path) -> Path:
    return path.with_name(f".{path.name}{_PARTIAL_SUFFIX}")


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_durably(path: Path, write: Callable[[Any], None]) -> None:
    with path.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder_checksums(folder: Path) -> None:
    """Record the SHA-256 of every file below a (sharded) checkpoint folder in FOLDER.sha256, atomically."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    text = "".join(f"{sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)
    target = checksum_file(folder)
    _write_durably(partial_file(target), lambda f: f.write(text.encode()))
    os.replace(partial_file(target), target)
    _fsync_folder(folder.parent)


def _folder_damage(folder: Path, recorded: Path) -> str | None:
    for line in recorded.read_text().splitlines():
        expected, _, name = line.partition("  ")
        member = folder / name
        if not member.is_file():
            return f"{name} is missing (listed in {recorded.name})"
        if sha256(member) != expected:
            return f"the bytes of {name} do not match the checksum in {recorded.name} (damaged)"
    return None


def write_checkpoint_atomically(path: Path, state_dict: dict[str, Any]) -> None:
    """torch.save `state_dict` to `path` through a temporary name, with its checksum recorded."""
    staged = partial_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_durably(staged, lambda f: torch.save(state_dict, f))
        line = f"{sha256(staged)}  {path.name}\n"
        _write_durably(partial_file(checksum_file(path)), lambda f: f.write(line.encode()))
        os.replace(partial_file(checksum_file(path)), checksum_file(path))
        os.replace(staged, path)
        _fsync_folder(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save's failed writes are RuntimeErrors
        for leftover in (staged, partial_file(checksum_file(path))):
            with contextlib.suppress(OSError):  # a read-only folder has none to remove
                leftover.unlink(missing_ok=True)
        raise CheckpointSaveError(_explain_failed_write(path, state_dict, e)) from None


def _explain_failed_write(path: Path, state_dict: dict[str, Any], error: Exception) -> str:
    folder = path.parent
    needed = _tensor_bytes(state_dict)
    try:
        free_bytes = shutil.disk_usage(folder).free
        free = f"{free_bytes / 2**20:.1f} MiB free"
    except OSError:
        free_bytes, free = None, "free space unknown"
    code = getattr(error, "errno", None)
    if code in _NO_ROOM:
        reason = os.strerror(code)
    elif free_bytes is not None and free_bytes < needed:
        # torch.save reports a short write as "unexpected pos ...", without the errno.
        reason = os.strerror(errno.ENOSPC)
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"cannot save checkpoint {path.name} in {folder}: {reason}; it needs about "
        f"{needed / 2**20:.1f} MiB ({free}); earlier checkpoints are untouched: make room and rerun the "
        f"same command to resume"
    )


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class AtomicCheckpointSaver(CheckpointSaver):
    """Composer's CheckpointSaver, but a whole (unsharded) checkpoint is written atomically with its checksum,
    locally or (staged locally, then uploaded with its checksum) to a bucket. Sharded checkpoints are saved as
    Composer saves them, then their files' checksums are recorded. The checkpoints beyond
    `num_checkpoints_to_keep` are deleted from the save folder's listing (`prune_checkpoints`): locally once a
    newer one is complete, in a bucket once it is uploaded. Composer's own count applies only to the copies
    staged locally for a bucket."""

    def __init__(
        self,
        folder: str,
        save_interval,
        overwrite: bool,
        num_checkpoints_to_keep: int,
        lock_lost: Callable[[], str | None] = lambda: None,
    ):
        # The names the Trainer would give its own saver for `save_folder`.
        filename, latest = "ep{epoch}-ba{batch}-rank{rank}.pt", "latest-rank{rank}.pt"
        remote_folder = parse_uri(folder)[2]
        super().__init__(
            folder=folder,
            filename=filename,
            remote_file_name=str(Path(remote_folder, filename)) if remote_folder else filename,
            latest_filename=latest,
            latest_remote_file_name=str(Path(remote_folder, latest)) if remote_folder else latest,
            save_interval=save_interval,
            overwrite=overwrite,
            num_checkpoints_to_keep=num_checkpoints_to_keep,
        )
        # Composer looks every 30 s for all ranks' files of a sharded checkpoint in the bucket, and the run's
        # end (a preemption's too) waits for that look: 1 s costs one request a second while a save uploads.
        self._symlink_upload_wait_before_next_try_in_seconds = 1.0
        self.bucket = folder if storage.is_uri(folder) and num_checkpoints_to_keep >= 0 else None
        self.prunes_locally = not storage.is_uri(folder) and num_checkpoints_to_keep >= 0
        self.uploading: list[Upload] = []  # rank 0's uploads to the bucket, in the order they started
        # Rank 0's run lock (train/run_lock.py): once lost, the folder may be another run's, whose
        # checkpoints pruning would delete.
        self.lock_lost = lock_lost

    def init(self, state: State, logger: Logger) -> None:
        if self.remote_uploader is not None:
            # Composer checks the credentials by uploading `.credentials_validated_successfully` to the
            # bucket's root, outside save_folder: credentials for the save folder's prefix alone (a usual
            # policy) fail there, and others get a stray object. The run lock and config.yaml are written
            # into save_folder before the Trainer is built, which checks the same where it matters.
            self.remote_uploader.init = lambda: None
        super().init(state, logger)
        if self.bucket is not None and not storage.removable(self.bucket):
            if dist.get_global_rank() == 0:
                log.warning(
                    f"save_num_checkpoints_to_keep={self.num_checkpoints_to_keep} is not applied in "
                    f"{storage.display(self.bucket)} (only s3:// objects can be deleted): it keeps them all"
                )
            self.bucket = None

    def batch_end(self, state: State, logger: Logger) -> None:
        super().batch_end(state, logger)  # raises a failed upload
        self._prune_uploaded()

    def fit_end(self, state: State, logger: Logger) -> None:
        super().fit_end(state, logger)  # waits for every upload
        self._prune_uploaded()

    def _prune_uploaded(self) -> None:
        newest = newest_uploaded(self.uploading)
        if newest is not None and self.bucket is not None and self.lock_lost() is None:
            prune_checkpoints(self.bucket, self.num_checkpoints_to_keep, newest)

    def _save_checkpoint(self, state: State, logger: Logger) -> None:
        self._save_checkpoint_files(state, logger)
        if self.prunes_locally and dist.get_global_rank() == 0:
            folder = Path(self.filename.format(state)).parent
            order = (state.timestamp.epoch.value, state.timestamp.batch.value)
            prune_checkpoints(folder, self.num_checkpoints_to_keep, order)

    def _rotate_checkpoints(self, sharding_enabled: bool = False) -> None:
        """Composer's count of the checkpoints this process saved, which holds only for the copies staged
        locally for a bucket (each uploaded before it goes). A local save folder is pruned from its listing
        instead (`_save_checkpoint`), so here its list is only kept to the newest ones."""
        if self.remote_uploader is None:
            del self.saved_checkpoints[: -max(1, self.num_checkpoints_to_keep)]
        elif sharding_enabled:
            super()._rotate_checkpoints(sharding_enabled)
        else:
            while len(self.saved_checkpoints) > self.num_checkpoints_to_keep:
                oldest = Path(self.saved_checkpoints.pop(0))
                oldest.unlink(missing_ok=True)
                checksum_file(oldest).unlink(missing_ok=True)

    def _save_checkpoint_files(self, state: State, logger: Logger) -> None:
        if state.fsdp_sharded_state_dict_enabled or self.weights_only or self.ignore_keys:
            checks = len(self.symlink_upload_tasks)
            super()._save_checkpoint(state, logger)
            if state.fsdp_sharded_state_dict_enabled:
                self._record_sharded_checksums()
                if self.bucket is not None and len(self.symlink_upload_tasks) > checks:  # rank 0, to a bucket
                    # Composer's check that every rank's files of the folder are in the bucket, which then
                    # uploads `latest-rank0.pt.symlink`.
                    order = (state.timestamp.epoch.value, state.timestamp.batch.value)
                    self.uploading.append(Upload(order, [self.symlink_upload_tasks[-1][0]]))
            return
        self.last_checkpoint_batch = state.timestamp.batch
        path = checkpoint.get_save_filename(state, self.filename.format(state, keep_placeholders=True))
        # Recorded before saving, so that the checkpoint's own saver state names it (as Composer does).
        self.all_saved_checkpoints_to_timestamp[path] = state.timestamp
        state_dict = {"state": state.state_dict(), "rng": reproducibility.get_rng_state()}
        failure = [None]
        if dist.get_global_rank() == 0:
            try:
                write_checkpoint_atomically(Path(path), state_dict)
            except CheckpointSaveError as e:
                failure[0] = str(e)
        dist.broadcast_object_list(failure, src=0)  # every rank stops, rather than waiting for rank 0
        if failure[0]:
            raise CheckpointSaveError(failure[0])
        if dist.get_global_rank() != 0:
            return
        if self.latest_filename is not None and self.num_checkpoints_to_keep != 0:
            point_latest_at(Path(self.latest_filename.format(state)), Path(path))
        self.saved_checkpoints.append(path)
        remote_name = self.remote_file_name.format(state).lstrip("/")
        if self.remote_uploader is not None:  # to a bucket; it copies each file before it returns
            uploads = [(remote_name, Path(path)), (remote_name + ".sha256", checksum_file(Path(path)))]
            futures = [
                self.remote_uploader.upload_file_async(
                    remote_file_name=remote, file_path=local, overwrite=self.overwrite
                )
                for remote, local in uploads
            ]
            if self.bucket is not None:
                self.uploading.append(Upload(checkpoint_order(Path(path)), futures))
        else:  # to a logger that keeps files, as Composer does
            self._upload_checkpoint(
                remote_file_name=remote_name, local_file_name=path, local_remote_file_names=[], logger=logger
            )
        if self.num_checkpoints_to_keep >= 0:
            self._rotate_checkpoints()

    def _record_sharded_checksums(self) -> None:
        """On rank 0, after Composer's sharded save (every rank's files are written when the coordinator's
        save returns): the newest folder's checksums."""
        if dist.get_global_rank() != 0 or not self.saved_checkpoints or self.remote_uploader is not None:
            return
        folder = Path(self.saved_checkpoints[-1]).parent
        if (folder / ".metadata").is_file():
            write_folder_checksums(folder)


@dataclass(frozen=True)
class Upload:
    """One checkpoint's upload to a bucket: done once all its futures are (its files, or Composer's check
    that every rank's files of a sharded folder are there)."""

    order: tuple[int, int]
    futures: list[Future]

    def done(self) -> bool:
        return all(future.done() for future in self.futures)

    def succeeded(self) -> bool:
        failed = (RemoteFilesExistingCheckStatus.TIMEOUT, RemoteFilesExistingCheckStatus.ERROR)
        return all(future.exception() is None and future.result() not in failed for future in self.futures)


def newest_uploaded(uploading: list[Upload]) -> tuple[int, int] | None:
    """The newest checkpoint now known to be wholly in the bucket, taking the uploads that finished off the
    front of `uploading` (in the order they started, so none counts while an older one is still going); None
    when no more finished. A failed upload never counts (Composer raises it)."""
    newest = None
    while uploading and uploading[0].done():
        upload = uploading.pop(0)
        if upload.succeeded():
            newest = upload.order
    return newest


def checkpoints_to_delete(names: Iterable[str], keep: int, newest: tuple[int, int]) -> list[list[str]]:
    """The run's checkpoints to delete from a save folder (local or a bucket), given its listing of files
    (names relative to it, as `storage.list_files` gives them), so that `keep` remain as Composer counts them
    (-1 keeps all, 0 none): of the checkpoints up to `newest` (the newest one known to be complete; newer ones
    are still being uploaded and neither count nor go), all but the newest `keep`. Only this run's names count
    (`ep{epoch}-ba{batch}-rank0.pt` files and `ep{epoch}-ba{batch}` sharded folders), never `.bad` ones,
    partial files of a save in progress, config.yaml, metrics.jsonl, the lock or exports. Each checkpoint,
    oldest first, is the list of its files in the order they go: its checksum, then the file, or the folder's
    `.metadata` and then its other files. So a deletion cut short leaves a checkpoint that is still listed (it
    goes next time) or an incomplete folder, never a lone checksum."""
    if keep < 0:
        return []
    names = set(names)
    members: dict[str, list[str]] = {}
    for name in names:
        top = name.partition("/")[0]
        order = checkpoint_order(Path(top))
        if order is not None and order <= newest:
            members.setdefault(top, []).append(name)
    oldest_first = sorted(members, key=lambda top: (checkpoint_order(Path(top)), top))
    doomed = oldest_first[: max(0, len(oldest_first) - keep)]
    return [
        [f"{top}.sha256"] * (f"{top}.sha256" in names)
        + sorted(members[top], key=lambda name: (not name.endswith("/.metadata"), name))
        for top in doomed
    ]


def prune_checkpoints(folder: str | Path, keep: int, newest: tuple[int, int]) -> None:
    """Delete from the save folder (local or a bucket) the run's checkpoints beyond the newest `keep`, each
    with its checksum (`checkpoints_to_delete`). Locally a `latest-rank0.pt` pointing at one goes first and a
    sharded folder goes whole. A listing or deletion that fails is a warning naming it, and training goes on;
    the rest of that checkpoint is left for the next time."""
    local = not storage.is_uri(folder)
    where = "the save folder" if local else "the bucket"
    try:
        names = storage.list_files(folder)
    except Exception as e:  # keeping the save folder tidy never stops training
        log.warning(f"save_num_checkpoints_to_keep: cannot list {storage.display(folder)}: {e}")
        return
    for files in checkpoints_to_delete(names, keep, newest):
        checkpoint = storage.join(folder, files[-1].partition("/")[0])
        paths = [storage.join(folder, name) for name in files]
        if local:  # with keep=0 Composer no longer moves the link; the folder's emptied subfolders go last
            link = Path(folder, LATEST)
            points_here = (
                link.is_symlink() and Path(folder, os.readlink(link)).resolve() == Path(checkpoint).resolve()
            )
            paths = [str(link)] * points_here + paths + [checkpoint] * Path(checkpoint).is_dir()
        for path in paths:
            try:
                storage.remove(path)
            except Exception as e:
                log.warning(
                    f"save_num_checkpoints_to_keep={keep}: cannot delete {path} ({e}); it stays in {where} "
                    "and is tried again after the next checkpoint"
                )
                break
        else:
            log.info(f"deleted checkpoint {checkpoint} from {where} (save_num_checkpoints_to_keep={keep})")


def point_latest_at(link: Path, target: Path) -> None:
    """Replace the `latest` symlink in one step, relative to its folder (as Composer makes it)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    staged = link.with_name(f".{link.name}{_PARTIAL_SUFFIX}")
    staged.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), staged)
    os.replace(staged, link)


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


def checkpoint_order(path: Path) -> tuple[int, int] | None:
    match = _CHECKPOINT_NAME.match(path.name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def is_run_entry(name: str) -> bool:
    """Whether a save folder's top-level entry is one a training run leaves: a checkpoint (file or sharded
    folder), its checksum, a moved-aside `.bad` one, an interrupted save's partial file, `latest-rank0.pt`, or
    `metrics.jsonl`. (config.yaml, tracebacks, the lock and exports are not: they are rewritten or kept.)"""
    if name == METRICS:
        return True
    base = name.removeprefix(".").removesuffix(_PARTIAL_SUFFIX)
    base = base.removesuffix(".sha256").removesuffix(".bad")
    return base == LATEST or _CHECKPOINT_NAME.match(base) is not None


def why_unusable(path: Path) -> str | None:
    """Why the checkpoint at `path` is incomplete or damaged, or None when it is whole."""
    recorded = checksum_file(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            return "incomplete sharded checkpoint (no .metadata)"
        if recorded.is_file():
            return _folder_damage(path, recorded)
        # No checksums (saved before they were recorded, or stopped before they were): every file its
        # .metadata refers to must be there, at full length.
        from modernbert_train.train.checkpoint import (
            CheckpointError,
            sharded_metadata,
            why_incomplete_sharded,
        )

        try:
            metadata = sharded_metadata(path)
        except CheckpointError:
            return "cannot be read (its .metadata is truncated or not a checkpoint's)"
        sizes = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
        reason = why_incomplete_sharded(sizes, metadata)
        return f"sharded checkpoint {reason}" if reason else None
    if not recorded.is_file():
        # Written before checksums were recorded: it must at least open as a checkpoint.
        from modernbert_train.train.checkpoint import CheckpointError, checkpoint_clock

        try:
            checkpoint_clock(path)
        except CheckpointError:
            return "cannot be read (truncated or not a checkpoint)"
        return None
    expected = recorded.read_text().split()[:1]
    if not expected or expected[0] != sha256(path):
        return f"its bytes do not match the checksum in {recorded.name} (damaged)"
    return None


def newest_good_checkpoint(folder: Path) -> tuple[Path | None, list[Skipped]]:
    """The newest whole checkpoint in `folder`, and those newer than it that were skipped (moved aside to
    NAME.bad, so Composer does not mistake them for a later run's) with why. Leftover partial files of
    interrupted saves are removed. `latest-rank0.pt` is pointed at the chosen checkpoint."""
    skipped = []
    for leftover in sorted(folder.glob(f".*{_PARTIAL_SUFFIX}")):
        leftover.unlink(missing_ok=True)
        if not leftover.name.startswith(f".{LATEST}"):
            skipped.append(Skipped(leftover.name, "an interrupted save's partial file (removed)"))
    candidates = sorted(
        (p for p in folder.iterdir() if checkpoint_order(p) is not None), key=checkpoint_order, reverse=True
    )
    for candidate in candidates:
        reason = why_unusable(candidate)
        if reason is None:
            link = folder / LATEST
            if not link.is_symlink() or Path(folder, os.readlink(link)).resolve() != candidate.resolve():
                point_latest_at(link, candidate)
            return candidate, skipped
        candidate.rename(candidate.with_name(candidate.name + ".bad"))
        if checksum_file(candidate).is_file():
            checksum_file(candidate).rename(
                checksum_file(candidate).with_name(candidate.name + ".bad.sha256")
            )
        skipped.append(Skipped(candidate.name, f"{reason}; moved aside to {candidate.name}.bad"))
    return None, skipped
