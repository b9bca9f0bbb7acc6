"""Checkpoint files (train/checkpoint_files.py): written whole or not at all, with a checksum; on resume the
newest whole one is taken and the damaged or incomplete newer ones are skipped, named and moved aside; a full
or read-only disk is one line naming the folder and the space needed."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from modernbert_train.train.checkpoint_files import (
    LATEST,
    CheckpointSaveError,
    checksum_file,
    newest_good_checkpoint,
    partial_file,
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
    path.mkdir()
    for rank in range(2):
        torch.save({"w": torch.randn(256)}, path / f"__{rank}_0.distcp")
    if complete:
        (path / ".metadata").write_bytes(os.urandom(64))
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
