"""Checkpoint files (train/checkpoint_files.py): written whole or not at all, with a checksum; on resume the
newest whole one is taken and the damaged or incomplete newer ones are skipped, named and moved aside; a full
or read-only disk is one line naming the folder and the space needed; the checkpoints beyond
save_num_checkpoints_to_keep go once a newer one is complete (locally) or uploaded (in a bucket), an earlier
attempt's included."""

import logging
import os
import subprocess
import warnings
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from composer.utils.remote_uploader import RemoteFilesExistingCheckStatus

from modernbert_train import storage
from modernbert_train.train.checkpoint_files import (
    LATEST,
    AtomicCheckpointSaver,
    CheckpointSaveError,
    Upload,
    checkpoints_to_delete,
    checksum_file,
    newest_good_checkpoint,
    newest_uploaded,
    partial_file,
    prune_checkpoints,
    write_checkpoint_atomically,
    write_folder_checksums,
)


def state_dict(batch: int, numel: int = 1000) -> dict:
    """A checkpoint-shaped dict: the clock Composer saves and some weights."""
    clock = {"epoch": 0, "batch": batch, "sample": 8 * batch, "token": 500 * batch}
    return {"state": {"timestamp": {"Timestamp": clock}, "model": {"w": torch.randn(numel)}}}


def save(folder: Path, batch: int) -> Path:
    path = folder / f"ep0-ba{batch}-rank0.pt"
    write_checkpoint_atomically(path, state_dict(batch))
    return path


def test_written_whole_with_a_checksum_sha256sum_accepts(tmp_path):
    path = save(tmp_path, 2)
    assert torch.load(path, weights_only=False)["state"]["timestamp"]["Timestamp"]["batch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, checksum_file(path).name]
    check = subprocess.run(["sha256sum", "-c", checksum_file(path).name], cwd=tmp_path, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_resume_skips_truncated_and_bit_flipped_checkpoints(tmp_path):
    oldest, middle, newest = (save(tmp_path, batch) for batch in (2, 4, 6))
    os.symlink(newest.name, tmp_path / LATEST)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a save cut off
    data = bytearray(middle.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)  # 4 KiB of garbage inside
    middle.write_bytes(bytes(data))

    chosen, skipped = newest_good_checkpoint(tmp_path)

    assert chosen == oldest
    assert [s.name for s in skipped] == [newest.name, middle.name]
    assert all("checksum" in s.reason and ".bad" in s.reason for s in skipped)
    assert os.readlink(tmp_path / LATEST) == oldest.name
    # moved aside: Composer would otherwise take them for files a resumed run overwrites
    assert not newest.exists() and not middle.exists()
    assert (tmp_path / f"{newest.name}.bad").exists() and (tmp_path / f"{middle.name}.bad").exists()


def test_resume_finds_checkpoints_when_the_latest_link_is_deleted(tmp_path):
    for batch in (2, 4):
        save(tmp_path, batch)
    chosen, skipped = newest_good_checkpoint(tmp_path)
    assert chosen.name == "ep0-ba4-rank0.pt" and skipped == []
    assert os.readlink(tmp_path / LATEST) == "ep0-ba4-rank0.pt"


def test_an_interrupted_save_is_removed_and_named(tmp_path):
    kept = save(tmp_path, 2)
    partial = partial_file(tmp_path / "ep0-ba4-rank0.pt")
    partial.write_bytes(b"PK\x03\x04 cut off")
    chosen, skipped = newest_good_checkpoint(tmp_path)
    assert chosen == kept
    assert [s.name for s in skipped] == [partial.name] and "interrupted save" in skipped[0].reason
    assert not partial.exists()


def test_checkpoints_without_a_checksum_are_checked_by_opening_them(tmp_path):
    """Checkpoints written before checksums were recorded."""
    readable, cut = tmp_path / "ep0-ba2-rank0.pt", tmp_path / "ep0-ba4-rank0.pt"
    torch.save(state_dict(2), readable)
    torch.save(state_dict(4), cut)
    cut.write_bytes(cut.read_bytes()[:100])
    chosen, skipped = newest_good_checkpoint(tmp_path)
    assert chosen == readable
    assert [s.name for s in skipped] == [cut.name] and "cannot be read" in skipped[0].reason


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (mounting needs root; skipped otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_is_one_line_naming_the_folder_and_space_and_keeps_earlier_checkpoints(small_tmpfs):
    earlier = save(small_tmpfs, 2)  # 4 KB
    before = earlier.read_bytes()
    with pytest.raises(CheckpointSaveError) as error:
        write_checkpoint_atomically(small_tmpfs / "ep0-ba4-rank0.pt", state_dict(4, numel=2**19))  # 2 MiB
    message = str(error.value)
    assert "\n" not in message
    assert str(small_tmpfs) in message and "No space left on device" in message
    assert "needs about 2.0 MiB" in message
    assert earlier.read_bytes() == before
    assert sorted(p.name for p in small_tmpfs.iterdir()) == [earlier.name, checksum_file(earlier).name]


def test_read_only_folder_is_one_line(small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(CheckpointSaveError, match="Read-only file system; it needs about"):
        save(small_tmpfs, 2)


def sharded(folder: Path, batch: int, complete: bool = True) -> Path:
    """A torch.distributed.checkpoint folder as two ranks leave it: a shard each, `.metadata` written last."""
    path = folder / f"ep0-ba{batch}"
    with warnings.catch_warnings():  # one process saving on purpose
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.randn(256)}, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    torch.save({"w": torch.randn(256)}, path / "__1_0.distcp")  # the other rank's shard
    if not complete:
        (path / ".metadata").unlink()
    return path


def test_sharded_folders_checksums_catch_a_damaged_or_missing_shard(tmp_path):
    """Each file's SHA-256 in FOLDER.sha256 (sha256sum format); a damaged shard, a missing shard or no
    .metadata skips the folder (and its checksums) aside; one from before checksums is taken as is."""
    legacy, good, missing, damaged, unfinished = (sharded(tmp_path, b) for b in (2, 4, 6, 8, 10))
    for folder in (good, missing, damaged, unfinished):
        if folder is not unfinished:
            write_folder_checksums(folder)
    (unfinished / ".metadata").unlink()  # killed after the shards, before the coordinator's metadata
    recorded = checksum_file(good).read_text().splitlines()
    assert [line.split("  ")[1] for line in recorded] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # sha256sum reads the names relative to where it runs: inside the folder
    check = subprocess.run(
        ["sha256sum", "-c", f"../{checksum_file(good).name}"], cwd=good, capture_output=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    (missing / "__1_0.distcp").unlink()
    data = bytearray((damaged / "__0_0.distcp").read_bytes())
    data[100:110] = os.urandom(10)
    (damaged / "__0_0.distcp").write_bytes(bytes(data))

    chosen, skipped = newest_good_checkpoint(tmp_path)

    assert chosen == good
    reasons = {s.name: s.reason for s in skipped}
    assert list(reasons) == ["ep0-ba10", "ep0-ba8", "ep0-ba6"]
    assert "no .metadata" in reasons["ep0-ba10"]
    assert (
        "__0_0.distcp do not match" in reasons["ep0-ba8"] and "__1_0.distcp is missing" in reasons["ep0-ba6"]
    )
    assert (tmp_path / "ep0-ba8.bad").is_dir() and (tmp_path / "ep0-ba8.bad.sha256").is_file()
    assert not checksum_file(damaged).exists()
    legacy_only = tmp_path / "legacy"
    legacy_only.mkdir()
    legacy.rename(legacy_only / legacy.name)
    assert newest_good_checkpoint(legacy_only) == (legacy_only / legacy.name, [])


def test_a_sharded_folder_without_checksums_must_hold_what_its_metadata_refers_to(tmp_path):
    """Saved before checksums were recorded, or stopped before they were: its .metadata says which files,
    and how long, make it whole."""
    whole, missing, short, unreadable = (sharded(tmp_path, b) for b in (2, 4, 6, 8))
    (missing / "__0_0.distcp").unlink()
    data = (short / "__0_0.distcp").read_bytes()
    (short / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    (unreadable / ".metadata").write_bytes(os.urandom(64))

    chosen, skipped = newest_good_checkpoint(tmp_path)

    assert chosen == whole
    assert {s.name: s.reason.split("; moved aside")[0] for s in skipped} == {
        "ep0-ba8": "cannot be read (its .metadata is truncated or not a checkpoint's)",
        "ep0-ba6": f"sharded checkpoint is incomplete (__0_0.distcp holds {len(data) // 2} bytes; its "
        f".metadata refers to {len(data)})",
        "ep0-ba4": "sharded checkpoint is incomplete (__0_0.distcp is missing; its .metadata refers to it)",
    }


# A bucket's save folder as it is listed: the run's checkpoints (one uploaded before checksums were recorded,
# a sharded folder with its checksum), one moved aside as damaged, one still uploading (its file is there,
# its checksum not yet), and the run's other files.
BUCKET_LISTING = [
    ".lock", "config.yaml", "metrics.jsonl", "traceback-rank0.log", "hf/config.json", "hf/model.safetensors",
    "latest-rank0.pt.symlink",
    "ep0-ba1-rank0.pt", "ep0-ba1-rank0.pt.sha256",
    "ep0-ba2-rank0.pt",
    "ep0-ba3-rank0.pt.bad", "ep0-ba3-rank0.pt.bad.sha256",
    "ep0-ba4/.metadata", "ep0-ba4/__0_0.distcp", "ep0-ba4/__1_0.distcp", "ep0-ba4.sha256",
    "ep0-ba10-rank0.pt", "ep0-ba10-rank0.pt.sha256",
    "ep1-ba12-rank0.pt", "ep1-ba12-rank0.pt.sha256",
    "ep1-ba14-rank0.pt",
]  # fmt: skip


def test_bucket_retention_deletes_the_runs_oldest_checkpoints_with_their_checksums():
    """Ordered by (epoch, batch), not by name; the one still uploading (newer than the newest uploaded)
    neither counts nor goes; each checkpoint's checksum goes first, a folder's .metadata before its shards."""
    doomed = checkpoints_to_delete(BUCKET_LISTING, keep=2, newest=(1, 12))
    assert doomed == [
        ["ep0-ba1-rank0.pt.sha256", "ep0-ba1-rank0.pt"],
        ["ep0-ba2-rank0.pt"],
        ["ep0-ba4.sha256", "ep0-ba4/.metadata", "ep0-ba4/__0_0.distcp", "ep0-ba4/__1_0.distcp"],
    ]
    none_kept = checkpoints_to_delete(BUCKET_LISTING, keep=0, newest=(1, 12))
    assert none_kept[:3] == doomed
    assert none_kept[3:] == [
        ["ep0-ba10-rank0.pt.sha256", "ep0-ba10-rank0.pt"],
        ["ep1-ba12-rank0.pt.sha256", "ep1-ba12-rank0.pt"],
    ]
    assert checkpoints_to_delete(BUCKET_LISTING, keep=1, newest=(0, 2)) == [
        ["ep0-ba1-rank0.pt.sha256", "ep0-ba1-rank0.pt"]
    ]
    assert checkpoints_to_delete(BUCKET_LISTING, keep=-1, newest=(1, 12)) == []
    assert checkpoints_to_delete(BUCKET_LISTING, keep=9, newest=(1, 14)) == []


def local_save_folder(folder: Path) -> dict[str, bytes]:
    """A local save folder after a resume: two earlier attempts' whole checkpoints (one from before
    checksums), a sharded one, one moved aside, an interrupted save's partial files, the newest checkpoint
    and the run's other files; returns the other files' bytes."""
    save(folder, 1)
    torch.save(state_dict(2), folder / "ep0-ba2-rank0.pt")
    write_folder_checksums(sharded(folder, 4))
    save(folder, 3).rename(folder / "ep0-ba3-rank0.pt.bad")
    checksum_file(folder / "ep0-ba3-rank0.pt").rename(folder / "ep0-ba3-rank0.pt.bad.sha256")
    save(folder, 10)
    os.symlink("ep0-ba10-rank0.pt", folder / LATEST)
    others = {
        ".ep0-ba11-rank0.pt.partial": b"half a save",
        ".ep0-ba11-rank0.pt.sha256.partial": b"",
        ".lock": b"{}",
        "config.yaml": b"seed: 17\n",
        "metrics.jsonl": b'{"batch": 1}\n',
        "hf/config.json": b"{}",
    }
    for name, data in others.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    return others


def test_a_local_save_folder_keeps_the_newest_checkpoints_whoever_saved_them(tmp_path):
    """The same choice as in a bucket, from the folder's listing: partial files, moved-aside and other files
    neither count nor go; a sharded folder goes whole after its checksum; the newest and the link stay."""
    others = local_save_folder(tmp_path)
    assert checkpoints_to_delete(storage.list_files(tmp_path), keep=2, newest=(0, 10)) == [
        ["ep0-ba1-rank0.pt.sha256", "ep0-ba1-rank0.pt"],
        ["ep0-ba2-rank0.pt"],
    ]
    prune_checkpoints(tmp_path, keep=1, newest=(0, 10))
    kept = {"ep0-ba10-rank0.pt", "ep0-ba10-rank0.pt.sha256", LATEST}
    moved_aside = {"ep0-ba3-rank0.pt.bad", "ep0-ba3-rank0.pt.bad.sha256"}
    assert {p.name for p in tmp_path.iterdir()} == kept | moved_aside | {
        name.split("/")[0] for name in others
    }
    assert all((tmp_path / name).read_bytes() == data for name, data in others.items())
    assert os.readlink(tmp_path / LATEST) == "ep0-ba10-rank0.pt"
    prune_checkpoints(tmp_path, keep=-1, newest=(0, 10))  # keeps all
    assert (tmp_path / "ep0-ba10-rank0.pt").is_file()


def test_keeping_no_local_checkpoint_removes_the_latest_link_first(tmp_path):
    """save_num_checkpoints_to_keep=0 keeps none, the newest included, as Composer does locally (where it no
    longer moves `latest-rank0.pt`): the link goes before the checkpoint it points at."""
    others = local_save_folder(tmp_path)
    prune_checkpoints(tmp_path, keep=0, newest=(0, 10))
    moved_aside = {"ep0-ba3-rank0.pt.bad", "ep0-ba3-rank0.pt.bad.sha256"}
    assert {p.name for p in tmp_path.iterdir()} == moved_aside | {name.split("/")[0] for name in others}


def test_a_local_checkpoint_that_cannot_be_deleted_is_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    local_save_folder(tmp_path)
    stuck = tmp_path / "ep0-ba4" / "__0_0.distcp"
    remove = storage.remove

    def remove_or_fail(path):
        if Path(path) == stuck:
            raise PermissionError(13, "Permission denied", str(path))
        remove(path)

    monkeypatch.setattr(storage, "remove", remove_or_fail)
    with caplog.at_level(logging.WARNING):
        prune_checkpoints(tmp_path, keep=1, newest=(0, 10))
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"save_num_checkpoints_to_keep=1: cannot delete {stuck} ([Errno 13] Permission denied: '{stuck}'); "
        "it stays in the save folder and is tried again after the next checkpoint"
    ]
    # its checksum and .metadata went first: what is left is an incomplete folder, which a resume skips
    assert sorted(p.name for p in (tmp_path / "ep0-ba4").iterdir()) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (tmp_path / "ep0-ba4.sha256").exists() and not (tmp_path / "ep0-ba2-rank0.pt").exists()
    monkeypatch.setattr(storage, "remove", remove)
    prune_checkpoints(tmp_path, keep=1, newest=(0, 10))  # the next checkpoint's pass
    assert not (tmp_path / "ep0-ba4").exists()


def finished(result=0) -> Future:
    future = Future()
    future.set_result(result)
    return future


def test_a_checkpoint_counts_as_uploaded_once_it_and_every_earlier_one_finished():
    checksum_going = Future()
    uploading = [
        Upload((0, 1), [finished(), finished()]),
        Upload((0, 2), [finished(), checksum_going]),
        Upload((0, 3), [finished(), finished()]),
    ]
    assert newest_uploaded(uploading) == (0, 1)
    assert newest_uploaded(uploading) is None  # ba3 is up, but ba2's checksum is still on its way
    checksum_going.set_result(0)
    assert newest_uploaded(uploading) == (0, 3) and uploading == []
    failed = Future()
    failed.set_exception(OSError("connection reset"))
    timed_out = finished(RemoteFilesExistingCheckStatus.TIMEOUT)  # a sharded folder's files never all came
    uploading += [Upload((0, 4), [finished(), failed]), Upload((0, 5), [timed_out])]
    assert newest_uploaded(uploading) is None and uploading == []


def test_pruning_a_bucket_warns_about_an_object_it_cannot_delete_and_goes_on(s3_bucket, monkeypatch, caplog):
    run = storage.join(s3_bucket, "run")
    for name in (
        "config.yaml",
        *(f"ep0-ba{b}-rank0.pt{suffix}" for b in (1, 2, 3, 4) for suffix in ("", ".sha256")),
    ):
        storage.write_text(storage.join(run, name), name)
    stuck = storage.join(run, "ep0-ba1-rank0.pt.sha256")
    remove = storage.remove

    def remove_or_fail(path):
        if path == stuck:
            raise storage.StorageError(f"{path}: access denied while trying to delete")
        remove(path)

    monkeypatch.setattr(storage, "remove", remove_or_fail)
    with caplog.at_level(logging.WARNING):
        prune_checkpoints(run, keep=2, newest=(0, 4))
    assert storage.list_files(run) == [
        "config.yaml",
        "ep0-ba1-rank0.pt",
        "ep0-ba1-rank0.pt.sha256",
        "ep0-ba3-rank0.pt",
        "ep0-ba3-rank0.pt.sha256",
        "ep0-ba4-rank0.pt",
        "ep0-ba4-rank0.pt.sha256",
    ]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"save_num_checkpoints_to_keep=2: cannot delete {stuck} ({stuck}: access denied while trying to "
        "delete); it stays in the bucket and is tried again after the next checkpoint"
    ]
    monkeypatch.setattr(storage, "remove", remove)
    prune_checkpoints(run, keep=2, newest=(0, 4))  # the next checkpoint's pass
    assert storage.list_files(run)[:2] == ["config.yaml", "ep0-ba3-rank0.pt"]


def test_the_saver_prunes_its_bucket_after_each_batch_once_uploads_finished(s3_bucket):
    run = storage.join(s3_bucket, "run")
    for batch in (1, 2, 3):
        for name in (f"ep0-ba{batch}-rank0.pt", f"ep0-ba{batch}-rank0.pt.sha256"):
            storage.write_text(storage.join(run, name), name)
    saver = AtomicCheckpointSaver(run, "1ba", overwrite=False, num_checkpoints_to_keep=1)
    try:
        going = Future()
        saver.uploading = [Upload((0, 2), [finished(), finished()]), Upload((0, 3), [finished(), going])]
        saver.batch_end(None, None)
        assert storage.list_files(run) == [
            f"ep0-ba{b}-rank0.pt{suffix}" for b in (2, 3) for suffix in ("", ".sha256")
        ]
        going.set_result(0)
        saver.batch_end(None, None)
        assert storage.list_files(run) == ["ep0-ba3-rank0.pt", "ep0-ba3-rank0.pt.sha256"]
    finally:
        saver.post_close()


def test_a_saver_that_lost_its_bucket_lock_prunes_nothing(s3_bucket):
    """Once the run lock is lost the save folder may be another run's: its checkpoints stay."""
    run = storage.join(s3_bucket, "taken")
    for batch in (1, 2):
        storage.write_text(storage.join(run, f"ep0-ba{batch}-rank0.pt"), "checkpoint")
    lost = [None]
    saver = AtomicCheckpointSaver(run, "1ba", False, num_checkpoints_to_keep=1, lock_lost=lambda: lost[0])
    try:
        lost[0] = "lost the run lock to another run"
        saver.uploading = [Upload((0, 2), [finished(), finished()])]
        saver.batch_end(None, None)
        assert storage.list_files(run) == ["ep0-ba1-rank0.pt", "ep0-ba2-rank0.pt"]
    finally:
        saver.post_close()
