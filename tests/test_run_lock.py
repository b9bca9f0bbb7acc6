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
