"""One run per save folder: a second run is refused naming the holder; a dead run's lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from modernbert_train.train.main import main
from modernbert_train.train.run_lock import LOCK_FILE, RunLockError, hold_run_lock

HOLD = "import sys, time; from modernbert_train.train.run_lock import hold_run_lock; " \
       "hold_run_lock(sys.argv[1]).claim(); print('held', flush=True); time.sleep(300)"  # fmt: skip


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_second_run_is_refused_naming_the_holder(tmp_path, holder, write_recipe, capsys):
    folder = tmp_path / "run"
    with pytest.raises(RunLockError) as refused:
        hold_run_lock(folder)
    assert f"host {socket.gethostname()}, pid {holder.pid} since " in str(refused.value)

    # the command: one line, exit 2, before the folder is touched
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(SystemExit) as done:
        main([str(write_recipe(save_folder=str(folder)))])
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.strip().splitlines()) == 1
    assert (
        f"save_folder {folder} is in use by another run (host {socket.gethostname()}, pid {holder.pid}" in err
    )
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_dead_runs_lock_is_taken_over(tmp_path, holder, capsys):
    folder = tmp_path / "run"
    holder.send_signal(signal.SIGKILL)  # dies without releasing anything
    holder.wait()
    lock = hold_run_lock(folder)
    lock.claim()
    try:
        err = capsys.readouterr().err
        assert f"took over the lock of {folder} from a run that ended" in err and f"pid {holder.pid}" in err
        mine = json.loads((folder / LOCK_FILE).read_text())
        assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname()
    finally:
        os.close(lock.fd)


def test_a_save_folder_that_cannot_be_written_is_one_line(tmp_path):
    folder = tmp_path / "file"
    folder.write_text("not a folder")
    with pytest.raises(RunLockError, match=f"save_folder {folder} cannot be written"):
        hold_run_lock(folder)


def test_a_bucket_save_folder_is_locked_by_a_lease(s3_bucket, write_recipe, capsys, monkeypatch):
    """A live holder renews its lease, so a second run watching the lock is refused naming it; a lease nobody
    renews is taken over once it ran out, by one of two runs racing for it; the last holder deletes it."""
    import threading

    from modernbert_train import storage
    from modernbert_train.train import run_lock

    monkeypatch.setattr(run_lock, "LEASE_SECONDS", 2.5)  # renewed every 0.5 s
    folder = storage.join(s3_bucket, "runs", "leased")
    uri = storage.join(folder, LOCK_FILE)
    first = hold_run_lock(folder)
    first.claim()
    assert json.loads(storage.read_text(uri))["pid"] == os.getpid()
    with pytest.raises(RunLockError) as refused:
        hold_run_lock(folder)
    here = f"host {socket.gethostname()}, pid {os.getpid()}"
    assert f"save_folder {folder} is in use by another run ({here}" in str(refused.value)
    assert "waiting up to" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # the command: exit 2, its last line names the holder
        main([str(write_recipe(save_folder=folder))])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and err[-1].startswith(
        f"modernbert-train: error: save_folder {folder} is in use"
    )
    assert len(err) == 2 and err[0].startswith(f"modernbert-train: {folder} is locked by {here}")

    # A run that stopped renewing (its process frozen, or dead on another machine) is taken over once the
    # lease ran out, and by one of two runs racing for it (each renews what it won).
    first._stop.set()
    first._renewer.join()
    results: list = []

    def contend():
        try:
            lock = hold_run_lock(folder)
            lock.claim()
            results.append(lock)
        except RunLockError as error:
            results.append(error)

    racers = [threading.Thread(target=contend) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    winners = [r for r in results if isinstance(r, run_lock.BucketRunLock)]
    assert len(winners) == 1 and len(results) == 2, results
    assert f"took over the lock of {folder} from a run that stopped renewing it" in capsys.readouterr().err
    first.drop()  # no longer its version: the winner's lock stays
    assert storage.exists(uri)
    winners[0].drop()
    assert not storage.exists(uri)


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(s3_bucket, capsys):
    from modernbert_train import storage

    folder = storage.join(s3_bucket, "runs", "killed")
    process = subprocess.Popen([sys.executable, "-c", HOLD, folder], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    process.send_signal(signal.SIGKILL)  # no atexit: the lock object stays, with a fresh lease
    process.wait()
    lock = hold_run_lock(folder)  # not after LEASE_SECONDS: its process is known to be gone
    try:
        err = capsys.readouterr().err
        assert f"took over the lock of {folder} from a run whose process is gone" in err
        assert f"pid {process.pid}" in err
    finally:
        lock.drop()


def test_a_scheme_without_conditional_writes_is_told_it_has_no_lock(capsys):
    assert hold_run_lock("gs://some-bucket/run") is None
    assert "cannot hold a run lock (its scheme has no conditional writes)" in capsys.readouterr().err
