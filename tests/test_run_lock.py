"""One run per save folder: a second run is refused naming the holder; a dead run's lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import HOLD

from modernbert_train.train.main import main
from modernbert_train.train.run_lock import LEASE_ENV, LOCK_FILE, RunLockError, hold_run_lock


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


def _wait_until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


OTHER = {"host": "elsewhere", "pid": 4242, "started": 1.7e9}  # another run's lock
OTHER_DESCRIBED = "host elsewhere, pid 4242 since 2023-11-14 22:13:20 UTC"


def test_a_waiting_run_judges_the_holder_by_the_holders_own_lease(s3_bucket, monkeypatch, capsys):
    """The lock names its lease: a run with a long lease takes over a short-leased holder's stale lock once
    that lease ran out, and a run with a short lease waits out a long-leased holder's instead of taking its
    lock over while it is alive (and is refused once it renews)."""
    import threading

    from modernbert_train import storage
    from modernbert_train.train import run_lock

    monkeypatch.setattr(run_lock, "LEASE_SECONDS", 600.0)
    folder = storage.join(s3_bucket, "runs", "short")
    uri = storage.join(folder, LOCK_FILE)
    storage.write_text(uri, json.dumps({**OTHER, "lease_seconds": 1.0}))
    began = time.monotonic()
    lock = hold_run_lock(folder)
    assert time.monotonic() - began < 30 and "from a run that stopped renewing it" in capsys.readouterr().err
    lock.drop()

    monkeypatch.setattr(run_lock, "LEASE_SECONDS", 1.0)
    folder = storage.join(s3_bucket, "runs", "long")
    uri = storage.join(folder, LOCK_FILE)
    storage.write_text(uri, json.dumps({**OTHER, "lease_seconds": 600.0}))
    results: list = []
    waiter = threading.Thread(target=lambda: results.append(_attempt(folder)), daemon=True)
    waiter.start()
    time.sleep(3)  # three of the waiter's own leases
    assert waiter.is_alive() and json.loads(storage.read_text(uri))["pid"] == OTHER["pid"]
    storage.write_text(uri, json.dumps({**OTHER, "lease_seconds": 600.0, "renewals": 1}))
    waiter.join(30)
    assert len(results) == 1 and isinstance(results[0], RunLockError), results
    assert "is in use by another run" in str(results[0])


def _attempt(folder: str):
    try:
        return hold_run_lock(folder)
    except RunLockError as error:
        return error


def test_a_bucket_lock_replaced_or_deleted_under_its_holder_is_lost(s3_bucket, monkeypatch):
    """A renewal refused because another version is there: lost, naming the new holder (or the deletion);
    the loser's drop() leaves the other holder's lock in place."""
    from modernbert_train import storage
    from modernbert_train.train import run_lock

    monkeypatch.setattr(run_lock, "LEASE_SECONDS", 2.5)  # renewed every 0.5 s
    folder = storage.join(s3_bucket, "runs", "replaced")
    uri = storage.join(folder, LOCK_FILE)
    lock = hold_run_lock(folder)
    lock.claim()
    _wait_until(lambda: lock.holder.get("renewals"), 5, "the lease was never renewed")
    assert lock.lost() is None
    storage.write_text(uri, json.dumps(OTHER))  # another run's version, written over this one's
    lost = _wait_until(lock.lost, 5, "the loss was never noticed")
    assert lost == f"lost the run lock {uri} to another run ({OTHER_DESCRIBED})"
    lock.drop()
    assert json.loads(storage.read_text(uri)) == OTHER

    folder = storage.join(s3_bucket, "runs", "deleted")
    uri = storage.join(folder, LOCK_FILE)
    lock = hold_run_lock(folder)
    lock.claim()
    storage.remove(uri)
    lost = _wait_until(lock.lost, 5, "the deletion was never noticed")
    assert lost == f"lost the run lock {uri}: it was deleted while this run held it"
    lock.drop()
    assert not storage.exists(uri)  # not written again


def test_a_bucket_lock_not_renewed_for_a_lease_is_lost(s3_bucket, monkeypatch):
    """Renewals failing (the bucket unreachable) are retried while the lease lasts by this process's clock;
    then the lock counts as lost (another run may take it over now), for good."""
    from modernbert_train import storage
    from modernbert_train.train import run_lock

    monkeypatch.setattr(run_lock, "LEASE_SECONDS", 2.0)  # renewed every 0.4 s
    folder = storage.join(s3_bucket, "runs", "partitioned")
    uri = storage.join(folder, LOCK_FILE)
    lock = hold_run_lock(folder)
    write = storage.put_if
    tries = []

    def unreachable(*args, **kwargs):
        tries.append(time.monotonic())
        raise storage.StorageError(f"{uri}: cannot write it: the endpoint did not answer")

    monkeypatch.setattr(storage, "put_if", unreachable)
    lock.claim()
    _wait_until(lambda: len(tries) >= 2, 5, "no renewal was tried")
    assert lock.lost() is None
    lost = _wait_until(lock.lost, 5, "the lease never ran out")
    assert time.monotonic() - lock.written_at >= 2.0
    assert lost == (
        f"could not renew the run lock {uri} for 2 s ({uri}: cannot write it: the endpoint did not answer), "
        "so another run may have taken it over"
    )
    monkeypatch.setattr(storage, "put_if", write)  # the bucket back: the loss stands
    time.sleep(0.5)
    assert lock.lost() == lost
    lock.drop()


def test_a_renewal_that_landed_unanswered_keeps_the_lock(s3_bucket, monkeypatch):
    """The version there names this process (a renewal whose answer was lost): still this run's lock."""
    from modernbert_train import storage
    from modernbert_train.train import run_lock

    monkeypatch.setattr(run_lock, "LEASE_SECONDS", 2.5)
    folder = storage.join(s3_bucket, "runs", "unanswered")
    uri = storage.join(folder, LOCK_FILE)
    lock = hold_run_lock(folder)
    lock.claim()
    storage.write_text(uri, json.dumps({**lock.holder, "renewals": 99}))
    _wait_until(
        lambda: json.loads(storage.read_text(uri))["renewals"] != 99, 5, "the lease stopped being renewed"
    )
    assert lock.lost() is None
    lock.drop()
    assert not storage.exists(uri)


@pytest.mark.slow
def test_a_run_whose_bucket_lock_is_taken_stops_without_saving(s3_bucket, write_recipe, tmp_path):
    """The lock replaced by another run's version mid-training: the run stops at the end of the batch where
    it learns of it, exits 1 with one line naming the lock and its new holder (no traceback), and saves no
    checkpoint, metrics row or export into the folder after that; the other run's lock stays."""
    import re

    from conftest import REPO, run_env, train_command

    from modernbert_train import storage

    folder = storage.join(s3_bucket, "runs", "taken")
    uri = storage.join(folder, LOCK_FILE)
    recipe = write_recipe(
        max_duration="2000ba",
        save_interval="2ba",
        save_folder=folder,
        data={"eval": []},
        export={"hf_dir": storage.join(folder, "hf")},
    )
    checkpoint = re.compile(r"ep\d+-ba(\d+)-rank0\.pt")
    log = tmp_path / "run.log"
    with log.open("w") as err:
        process = subprocess.Popen(
            train_command(recipe),
            cwd=REPO,
            env=run_env(**{LEASE_ENV: "6"}),  # renewed every 1.2 s
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        # Uploaded at the first checkpoint, before that checkpoint's own (slower) upload.
        metrics = storage.join(folder, "metrics.jsonl")
        _wait_until(
            lambda: process.poll() is not None or storage.exists(metrics), 300, "no checkpoint was saved"
        )
        assert process.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
        storage.write_text(uri, json.dumps(OTHER))
        process.wait(timeout=120)
    finally:
        process.kill()
        process.wait()
    err = log.read_text()
    errors = [line for line in err.splitlines() if line.startswith("modernbert-train: error:")]
    assert process.returncode == 1 and len(errors) == 1, err[-3000:]
    assert "Traceback" not in err
    stopped = re.fullmatch(
        rf"modernbert-train: error: lost the run lock {re.escape(uri)} to another run "
        rf"\({OTHER_DESCRIBED}\); stopped at batch (\d+) without saving anything more to {re.escape(folder)}",
        errors[0],
    )
    assert stopped, errors[0]
    at = int(stopped[1])
    names = storage.list_files(folder)
    assert any(checkpoint.fullmatch(name) for name in names) and at < 2000
    # Checkpoints and their checksums: all of batches before the loss.
    saved = [int(m[1]) for name in names if (m := re.search(r"-ba(\d+)", name))]
    assert max(saved) < at, (sorted(names), at)
    rows = [json.loads(line) for line in storage.read_text(metrics).splitlines()]
    assert max(row["batch"] for row in rows) < at
    assert "hf/config.json" not in names
    assert json.loads(storage.read_text(uri)) == OTHER  # the other run's lock is left in place


class _FakeState:
    """What SaveOnSigterm (and Composer's interval scheduler) reads of Composer's State, for a run of
    `batches` batches on one rank."""

    def __init__(self, batches: int):
        from types import SimpleNamespace

        from composer.core import Timestamp

        self.batches = batches
        self.batch = 0
        self.stopped = False
        self.timestamp = self.previous_timestamp = Timestamp()
        self.device = SimpleNamespace(tensor_to_device=lambda tensor: tensor)

    def step(self) -> None:
        from composer.core import Timestamp

        self.batch += 1
        self.previous_timestamp, self.timestamp = self.timestamp, Timestamp(batch=self.batch)

    def get_elapsed_duration(self) -> float:
        return self.batch / self.batches

    def stop_training(self) -> None:
        self.stopped = True


def _train_until_stopped(lose_at: int | str | None, batches: int = 8, sigterm_at: int | None = None):
    """SaveOnSigterm over a fake run whose lock is lost from batch `lose_at` ("after": once training ended):
    the batches it would save at, where it stopped, and the callback."""
    from composer.core import Event

    from modernbert_train.train.preemption import SaveOnSigterm

    state = _FakeState(batches)
    lost = []
    stop = SaveOnSigterm("2ba", saves=True, lock_lost=lambda: lost[0] if lost else None)
    saved = []
    while not state.stopped and state.batch < batches:
        state.step()
        if state.batch == lose_at:
            lost.append("lost the run lock s3://b/run/.lock to another run (host elsewhere, pid 4242)")
        if state.batch == sigterm_at:
            stop.requested = True
        if stop.save_interval(state, Event.BATCH_CHECKPOINT):
            saved.append(state.batch)
        stop.batch_checkpoint(state, None)
    if stop.save_interval(state, Event.FIT_END):
        saved.append("fit_end")
    if lose_at == "after":
        lost.append("could not renew the run lock s3://b/run/.lock for 120 s")
    stop.check_lock(state)
    return saved, state.batch, stop


def test_a_lost_lock_stops_the_run_at_the_batch_without_saving():
    saved, at, stop = _train_until_stopped(lose_at=5)
    assert (saved, at, stop.exit_code()) == ([2, 4], 5, 1) and stop.lost.startswith("lost the run lock")
    saved, at, stop = _train_until_stopped(lose_at=4, sigterm_at=4)  # outranks a SIGTERM: nothing saved
    assert (saved, at, stop.exit_code()) == ([2], 4, 1)
    saved, at, stop = _train_until_stopped(lose_at=8)  # its last batch: still a failure, not saved
    assert (saved, at, stop.exit_code()) == ([2, 4, 6], 8, 1)
    saved, at, stop = _train_until_stopped(lose_at="after")  # after the last checkpoint: no export
    assert (saved, at, stop.exit_code()) == ([2, 4, 6, 8], 8, 1) and stop.lost.startswith("could not renew")
    saved, at, stop = _train_until_stopped(lose_at=None, sigterm_at=3)  # as before
    assert (saved, at, stop.exit_code()) == ([2, 3, "fit_end"], 3, 75)
    saved, at, stop = _train_until_stopped(lose_at=None)
    assert (saved, at, stop.exit_code(), stop.lost) == ([2, 4, 6, 8], 8, 0, None)


RANK_RUN = """
import json, sys
import torch.distributed
sys.path.insert(0, "tests")
from test_run_lock import _train_until_stopped
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
saved, at, stop = _train_until_stopped(lose_at=5 if rank == 0 else None)  # only rank 0 holds the lock
print(json.dumps([saved, at, stop.exit_code(), stop.lost]))
"""


@pytest.mark.slow
def test_every_rank_stops_at_the_batch_where_rank_0_lost_the_lock():
    """Two gloo ranks: rank 0's loss reaches rank 1 through the per-batch agreement (no collective added)."""
    from conftest import REPO, free_port, run_env

    env = run_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_RUN],
            cwd=REPO,
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = [json.loads(rank.communicate(timeout=120)[0]) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    assert results[0][:3] == results[1][:3] == [[2, 4], 5, 1]
    assert results[0][3].startswith("lost the run lock s3://b/run/.lock")
    assert results[1][3] == "rank 0 lost the save_folder's run lock"
