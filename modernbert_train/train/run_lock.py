"""One run per save folder: `<save_folder>/.lock` is held by the run's rank 0 for its whole life and names
the holder (host, pid, start time), so a second run on the folder is refused with who holds it.

A local folder's lock is an flock. The kernel releases it when its process dies, however it dies; a lock file
still naming a holder but no longer held is a dead run's, and is taken over (and said so). The holder is
written once the run is known to train (a rerun of a finished run changes nothing in the folder); a run that
ends normally empties it. A file system that cannot lock (Lustre without its flock mount option) gets no lock,
and is told so. On several nodes only rank 0 takes the lock (`hold_run_lock_on_rank_0`).

A bucket has no flock and its holder may be on another host: the lock is an object created only if absent
(S3's conditional write) and renewed by the run every LEASE_SECONDS / 5 (a write conditional on the version
it last wrote). A run finding it watches it: a new version means a live holder (refused); a lease not renewed
for LEASE_SECONDS by the server's clock, or a holder that ran on this machine and whose process is gone,
is a dead run's and is taken over, by a write conditional on that stale version, so two runs racing for it
cannot both win. A run that ends deletes it. Schemes without conditional writes (gs://, ...) get no lock,
and are told so.

A holder can lose a bucket lock: a renewal refused because another version is there (another run took it
over, or the object was replaced or deleted), or no renewal for LEASE_SECONDS by this process's clock (the
bucket unreachable: another run may take the lease over by now). `lost()` then says why, for good; the
training loop asks it at every batch (train/preemption.py) and stops, saving nothing more.
"""

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from modernbert_train import storage

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
LEASE_ENV = "MODERNBERT_RUN_LOCK_LEASE_SECONDS"


def _lease_seconds() -> float:
    """120 s, or the value of LEASE_ENV: for tests, which need a lease that runs out in seconds. Every run
    that may share a bucket save_folder must use the same lease: a waiting run judges the holder's by its
    own."""
    text = os.environ.get(LEASE_ENV, "120")
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{LEASE_ENV}={text!r}: give a number of seconds > 0")
    return seconds


# A bucket lock's lease: renewed every fifth of it, so a holder survives four failed renewals in a row.
LEASE_SECONDS = _lease_seconds()


class RunLockError(ValueError):
    """The save folder is another run's, or cannot hold a lock; one line naming the folder."""


class RunLock:
    def __init__(self, fd: int):
        self.fd = fd
        self.claimed = False

    def claim(self) -> None:
        """Name this process as the holder, until it ends."""
        self.claimed = True
        _write(
            self.fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        )
        atexit.register(_release, self.fd)

    def drop(self) -> None:
        """Let go of the lock now (a run refused or with nothing to do, in a process that goes on)."""
        if self.claimed:
            atexit.unregister(_release)  # its fd number may be another file's once closed
            _release(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def lost(self) -> str | None:
        """Never: the kernel holds an flock for as long as its process lives."""
        return None


class BucketRunLock:
    def __init__(self, uri: str, holder: dict, etag: str, written_at: float):
        self.uri = uri
        self.holder = holder
        self.etag = etag  # the version this run wrote last: renewals and the delete are conditional on it
        # When the write of that version was sent (time.monotonic()): the server's lease runs from no earlier.
        self.written_at = written_at
        self.claimed = False
        self._lost: str | None = None
        self._last_error = ""
        self._stop = threading.Event()
        # Renewed from the start: setting up a run (a checkpoint read from the bucket) may outlast the lease.
        self._renewer = threading.Thread(target=self._renew_until_stopped, name="run-lock-lease", daemon=True)
        self._renewer.start()

    def claim(self) -> None:
        """Keep the lock until the process ends (or drops it)."""
        self.claimed = True
        atexit.register(self.drop)

    def lost(self) -> str | None:
        """Why this run no longer holds the lock (one line naming it), or None while it does. Once lost, lost
        for good, even if a late renewal gets through."""
        if self._lost is None and time.monotonic() - self.written_at >= LEASE_SECONDS:
            error = f" ({self._last_error})" if self._last_error else ""
            self._lose(
                f"could not renew the run lock {self.uri} for {LEASE_SECONDS:.0f} s{error}, so another run "
                "may have taken it over"
            )
        return self._lost

    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            log.error("%s: stopping at the end of this batch, without saving", why)

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 5) and self.lost() is None:
            # A new version each time (the count): a run waiting on the lock sees the holder is alive.
            self.holder["renewals"] = self.holder.get("renewals", 0) + 1
            sent = time.monotonic()
            try:
                etag = storage.put_if(self.uri, json.dumps(self.holder).encode(), self.etag)
                if etag is None:  # not the version this run wrote last
                    self._look_at_refused_lock()
                    continue
            except storage.StorageError as e:  # the bucket unreachable for a while: the lease still runs
                self._last_error = str(e)
                log.warning("could not renew the run lock %s: %s", self.uri, e)
                continue
            self.etag, self.written_at = etag, sent

    def _look_at_refused_lock(self) -> None:
        """Still this run's lock when the version there names this process (a renewal that reached the bucket
        but whose answer did not reach us): renewed from that version on (the lease still counted from the
        last renewal known to have landed). Otherwise lost, to the holder it names, or deleted."""
        current = storage.read_versioned(self.uri)
        if current is None:
            self._lose(f"lost the run lock {self.uri}: it was deleted while this run held it")
            return
        data, etag, _ = current
        holder = _parse(data.decode(errors="replace"))
        if all(holder.get(key) == self.holder[key] for key in ("host", "pid", "started")):
            self.etag = etag
            return
        self._lose(f"lost the run lock {self.uri} to another run ({_describe(holder)})")

    def drop(self) -> None:
        """Stop renewing and delete the lock, if it is still this run's version."""
        self._stop.set()
        self._renewer.join()
        if self.claimed:
            atexit.unregister(self.drop)
        with contextlib.suppress(storage.StorageError):
            current = storage.read_versioned(self.uri)
            if current is not None and current[1] == self.etag:
                storage.remove(self.uri)


def hold_run_lock_on_rank_0(folder: str | Path, dist_timeout: float) -> RunLock | BucketRunLock | None:
    """`hold_run_lock` on rank 0 (None on the other ranks), whose refusal every rank raises: on several nodes
    a rank 0 that exited alone left the other nodes' ranks waiting for it at their first collective until
    dist_timeout, to fail naming a lost connection (their launchers do not know of rank 0's exit). Every rank
    calls it; it sets up the process group as the Trainer would (the Trainer reuses it)."""
    from composer.utils import dist, get_device

    if dist.get_world_size() == 1:
        return hold_run_lock(folder)
    dist.initialize_dist(get_device(None), dist_timeout)
    lock, error, failure = None, None, [None]
    if dist.get_global_rank() == 0:
        try:
            lock = hold_run_lock(folder)
        except Exception as e:  # a bucket's failing too: every rank stops
            error, failure[0] = e, str(e)
    dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise RunLockError(failure[0])
    return lock


def hold_run_lock(folder: str | Path) -> RunLock | BucketRunLock | None:
    """Take the save folder's lock for the rest of this process (None where the scheme has no way to lock).
    Raises RunLockError."""
    if storage.is_uri(folder):
        return _hold_bucket_lock(str(folder))
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunLockError(f"save_folder {folder} cannot be written: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(_read(fd))
        os.close(fd)
        raise RunLockError(
            f"save_folder {folder} is in use by another run ({holder}); wait for it to end or use another "
            f"save_folder"
        ) from None
    except OSError as e:  # a file system without locks (Lustre without its flock mount option: ENOSYS)
        os.close(fd)
        print(
            f"modernbert-train: warning: {folder / LOCK_FILE} cannot be locked ({e.strerror}): make sure no "
            "other run uses this save_folder",
            file=sys.stderr,
        )
        return None
    previous = _read(fd)
    if previous:
        print(
            f"modernbert-train: took over the lock of {folder} from a run that ended without releasing it "
            f"({_describe(previous)})",
            file=sys.stderr,
        )
    return RunLock(fd)


def _holder() -> dict:
    """Who holds a lock: host and pid to tell the user, and where that pid means this process (the kernel's
    boot and the pid namespace), so a run on the same machine can see that a holder is dead at once."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
        "scope": _pid_scope(),
        "lease_seconds": LEASE_SECONDS,  # a waiting run judges this holder by its own lease, not the waiter's
    }


def _lease_of(holder: dict) -> float:
    """The lease the holder renews within (written since leases became settable), else this run's."""
    lease = holder.get("lease_seconds")
    if isinstance(lease, int | float) and not isinstance(lease, bool) and lease > 0:
        return float(lease)
    return LEASE_SECONDS


def _pid_scope() -> str | None:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _dead_here(holder: dict) -> bool:
    """Whether the holder ran in this machine's boot and pid namespace, and its process is gone."""
    if (
        holder.get("scope") is None
        or holder.get("scope") != _pid_scope()
        or not isinstance(holder.get("pid"), int)
    ):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _hold_bucket_lock(folder: str) -> BucketRunLock | None:
    if not storage.supports_conditional_writes(folder):
        print(
            f"modernbert-train: warning: {folder} cannot hold a run lock (its scheme has no conditional "
            "writes): make sure no other run uses this save_folder",
            file=sys.stderr,
        )
        return None
    uri = storage.join(folder, LOCK_FILE)
    mine = _holder()
    body = json.dumps(mine).encode()
    first_seen = None
    deadline = time.monotonic() + 2 * LEASE_SECONDS  # at most: a lease just renewed, then run out
    while time.monotonic() < deadline:
        sent = time.monotonic()
        etag = storage.put_if(uri, body)
        if etag is not None:
            return BucketRunLock(uri, mine, etag, sent)
        current = storage.read_versioned(uri)
        if current is None:
            continue  # released between the two calls
        data, seen, age = current
        holder = _parse(data.decode(errors="replace"))
        lease = _lease_of(holder)
        dead_here = _dead_here(holder)
        if dead_here or age >= lease:
            sent = time.monotonic()
            etag = storage.put_if(uri, body, seen)  # only over that stale version: one taker wins
            if etag is not None:
                how = "whose process is gone" if dead_here else f"that stopped renewing it {age:.0f} s ago"
                print(
                    f"modernbert-train: took over the lock of {folder} from a run {how} "
                    f"({_describe(holder)})",
                    file=sys.stderr,
                )
                return BucketRunLock(uri, mine, etag, sent)
            continue
        if first_seen is None:
            # Alive, or dead on another machine: a live holder writes a new version every fifth of its lease.
            first_seen = seen
            deadline = max(deadline, time.monotonic() + 2 * lease)
            print(
                f"modernbert-train: {folder} is locked by {_describe(holder)}, renewed {age:.0f} s ago: "
                f"waiting up to {lease - age:.0f} s to see whether that run is alive",
                file=sys.stderr,
            )
        elif seen != first_seen:
            raise RunLockError(
                f"save_folder {folder} is in use by another run ({_describe(holder)}, renewing its lock); "
                "wait for it to end or use another save_folder"
            )
        time.sleep(min(5.0, lease / 20))
    raise RunLockError(f"save_folder {folder}: its lock kept changing hands for {2 * LEASE_SECONDS:.0f} s")


def _release(fd: int) -> None:
    with contextlib.suppress(OSError):  # already closed by its owner
        _write(fd, "")


def _read(fd: int) -> dict:
    return _parse(os.pread(fd, 4096, 0).decode(errors="replace"))


def _parse(text: str) -> dict:
    text = text.strip()
    try:
        holder = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"host": "?", "pid": "?", "note": "unreadable lock file"}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    started = holder.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{since}"


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    os.fsync(fd)
