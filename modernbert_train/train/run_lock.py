"""One run per save folder: `<save_folder>/.lock` is held (flock) by the run's rank 0 for its whole life and
names the holder (host, pid, start time), so a second run on the folder is refused with who holds it.

The kernel releases the lock when its process dies, however it dies; a lock file still naming a holder but no
longer held is a dead run's, and is taken over (and said so). The holder is written once the run is known
to train (a rerun of a finished run changes nothing in the folder); a run that ends normally empties it.
"""

import atexit
import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"


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


def hold_run_lock(folder: str | Path) -> RunLock:
    """Take the save folder's lock for the rest of this process. Raises RunLockError."""
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
    previous = _read(fd)
    if previous:
        print(
            f"modernbert-train: took over the lock of {folder} from a run that ended without releasing it "
            f"({_describe(previous)})",
            file=sys.stderr,
        )
    return RunLock(fd)


def _release(fd: int) -> None:
    with contextlib.suppress(OSError):  # already closed by its owner
        _write(fd, "")


def _read(fd: int) -> dict:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
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
