"""Crash safety end to end: a full disk, a kill in the middle of a save, damaged and missing checkpoint
files, and SIGTERM without a save folder; each ends in one line and an exit code, and the same command
resumes from the newest whole checkpoint."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, read_metrics, run_env, run_train, train_command

from modernbert_train.train.preemption import EXIT_TERMINATED

pytestmark = pytest.mark.slow


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(*args), cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300
    )


def checksums_hold(folder: Path) -> None:
    for recorded in folder.glob("*.pt.sha256"):
        check = subprocess.run(["sha256sum", "-c", recorded.name], cwd=folder, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_disk_full_is_one_line_and_the_same_command_resumes_once_there_is_room(write_recipe, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    # Room for one checkpoint of the tiny model (1.6 MB) and the run's small files, not for two.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(folder)])
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        recipe = write_recipe(max_duration="6ba", save_interval="2ba", autoresume=True, data={"eval": []})
        full = train(recipe)
        assert full.returncode == 1, full.stderr[-3000:]
        assert "Traceback" not in full.stderr
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("modernbert-train: error: cannot save checkpoint ep0-ba4-rank0.pt in ")
        assert f"in {folder}: No space left on device; it needs about " in last
        assert sorted(p.name for p in folder.glob("ep*")) == ["ep0-ba2-rank0.pt", "ep0-ba2-rank0.pt.sha256"]
        checksums_hold(folder)

        subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)
        resumed = run_train(recipe)  # the same command
        assert "Loading checkpoint" in resumed.stderr
        assert [row["batch"] for row in read_metrics(folder / "metrics.jsonl")] == list(range(1, 7))
        checksums_hold(folder)
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_before_the_first_checkpoint_is_one_line_and_leaves_nothing_half_written(
    write_recipe, tmp_path
):
    folder = tmp_path / "run"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)])
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        with pytest.raises(OSError), (folder / "filler").open("ab", buffering=0) as filler:
            while True:  # every block taken: the lock's holder and config.yaml cannot be written
                filler.write(b"x" * 4096)
        recipe = write_recipe(max_duration="4ba", save_interval="2ba", autoresume=True, data={"eval": []})
        full = train(recipe)
        assert full.returncode == 1, full.stderr[-3000:]
        assert "Traceback" not in full.stderr
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("modernbert-train: error: ") and "No space left on device" in last, last
        assert "rerun the same command" in last
        assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.startswith("ep")]

        (folder / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)
        run_train(recipe)  # the same command, once there is room
        assert [row["batch"] for row in read_metrics(folder / "metrics.jsonl")] == list(range(1, 5))
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_killed_while_saving_then_damaged_and_unlinked_checkpoints_are_skipped(write_recipe, tmp_path):
    folder = tmp_path / "run"
    recipe = write_recipe(max_duration="6ba", save_interval="2ba", autoresume=True, data={"eval": []})
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            train_command(recipe), cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT
        )
    # Kill the moment the second checkpoint's first file appears (its temporary name, or its final one).
    deadline = time.monotonic() + 240
    while not folder.is_dir() or not any("ep0-ba4-rank0.pt" in name for name in os.listdir(folder)):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for the second checkpoint"
        time.sleep(0.002)
    process.kill()
    process.wait()
    checksums_hold(folder)  # whatever carries a checkpoint's name is whole

    run_train(recipe)  # the same command finishes the run
    assert [row["batch"] for row in read_metrics(folder / "metrics.jsonl")] == list(range(1, 7))

    # The newest checkpoint damaged (4 KiB of garbage) and the latest link deleted: a longer run resumes
    # from the one before, saying which it skipped and why.
    newest = folder / "ep0-ba6-rank0.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)
    newest.write_bytes(bytes(data))
    (folder / "latest-rank0.pt").unlink()
    longer = run_train(recipe, "max_duration=8ba")
    assert f"skipped {newest}: its bytes do not match the checksum" in longer.stderr
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba8-rank0.pt"
    rows = read_metrics(folder / "metrics.jsonl")
    assert [row["batch"] for row in rows] == list(range(1, 9))
    checksums_hold(folder)


def test_sigterm_without_a_save_folder_stops_without_claiming_a_checkpoint(write_recipe, tmp_path):
    recipe = write_recipe(max_duration="200ba", save_folder=None, data={"eval": []})
    log = tmp_path / "run.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            train_command(recipe), cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 240
    while "[batch=2/200]" not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for training"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == EXIT_TERMINATED, log.read_text()[-3000:]
    text = log.read_text()
    assert "no save_folder, so no checkpoint is saved" in text
    assert "saving a checkpoint" not in text
