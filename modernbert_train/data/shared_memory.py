"""Shared-memory segments that killed runs left behind in /dev/shm.

Streaming names each dataset's segments `<prefix>_<name>` (prefix a six-digit number) and removes them when
the dataset is closed; a killed process cannot, and a later job on the host may then trip over them. A
segment is stale when no process maps it: a live dataset keeps every segment it made mapped. Streaming's own
`clean_stale_shared_memory` removes every segment, also those of runs still going, so it is not used here.

Streaming also registers a dataset's prefix by looking for a free one, then creating it, on every rank on
its own: two jobs that start together on one host can pick the same prefix, and when the later creation fails
its ranks leave the prefix protocol at different barriers and hang (or one rank joins the other job's
prefix). `registration_lock` makes the look-and-create of one job's ranks exclusive on each host.
"""

import contextlib
import fcntl
import logging
import os
import random
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN
from streaming.base.world import World

log = logging.getLogger(__name__)

SHM_FOLDER = Path("/dev/shm")
_STREAMING_SEGMENT = re.compile(rf"^\d{{6}}_({'|'.join(SHM_TO_CLEAN)})$")
_STREAMING_FILELOCK = re.compile(rf"^(\d{{6}})_({BARRIER_FILELOCK}|{CACHE_FILELOCK})$")
LOCK_NAME = "modernbert-train-streaming.lock"
LOCK_WARN_AFTER_S = 30.0


def mapped_segments() -> set[str]:
    """Names of /dev/shm files that some process (that this one may inspect) has mapped."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # ended meanwhile, or another user's
            continue
        for line in text.splitlines():
            _, found, name = line.partition(f" {SHM_FOLDER}/")
            if found:
                names.add(name.removesuffix(" (deleted)"))
    return names


def remove_stale_streaming_segments(min_age_s: float = 5.0) -> list[str]:
    """Remove streaming's segments that no process maps; the names removed. A segment younger than
    `min_age_s` is left alone: its creator may not have mapped it yet."""
    if not SHM_FOLDER.is_dir():
        return []
    candidates = [path for path in SHM_FOLDER.iterdir() if _STREAMING_SEGMENT.match(path.name)]
    if not candidates:
        return []
    in_use = mapped_segments()
    removed = []
    now = time.time()
    for path in candidates:
        try:
            if path.name in in_use or now - path.stat().st_mtime < min_age_s:
                continue
            os.unlink(path)
        except OSError:  # gone meanwhile, or another user's
            continue
        removed.append(path.name)
    return removed


def remove_stale_streaming_filelocks(min_age_s: float = 5.0) -> list[str]:
    """Remove streaming's file locks (in this process's temp folder) whose prefix has no segment left:
    streaming skips every prefix that has one, so a killed run's locks would otherwise pile up. Streaming
    registers a prefix's segments before it makes its locks, so a lock without segments is a dead run's."""
    folder = Path(tempfile.gettempdir())
    live = {name[:6] for name in os.listdir(SHM_FOLDER)} if SHM_FOLDER.is_dir() else set()
    removed, now = [], time.time()
    for path in folder.iterdir():
        found = _STREAMING_FILELOCK.match(path.name)
        if not found or found.group(1) in live:
            continue
        try:
            if now - path.stat().st_mtime < min_age_s:
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(path.name)
    return removed


def _lock_path() -> Path:
    """Host-wide, like the segments: /dev/shm where it exists (TMPDIR may differ between jobs)."""
    return (SHM_FOLDER if SHM_FOLDER.is_dir() else Path(tempfile.gettempdir())) / LOCK_NAME


def _everyone(flag: bool) -> bool:
    """True when `flag` is true on every rank (the rank itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


@contextlib.contextmanager
def registration_lock() -> Iterator[None]:
    """Hold, on every host of the job, the lock under which streaming datasets register their prefix.

    Each host's local leader takes the host's lock; the job goes on once every leader holds its own, else
    the leaders that got one let it go and all try again after a random pause (a blocking wait could
    deadlock two jobs that share several hosts). The lock is an flock: it dies with its holder."""
    leader = World.detect().is_local_leader
    path = _lock_path()
    handle, warned, start = None, False, time.monotonic()
    pause = random.Random(f"{socket.gethostname()}-{os.getpid()}")
    try:
        while True:
            if leader and handle is None:
                handle = _try_lock(path)
            if _everyone(handle is not None or not leader):
                break
            if handle is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
                handle = None
            if not warned and time.monotonic() - start > LOCK_WARN_AFTER_S:
                log.warning("data: waiting for %s (%s)", path, _holder(path))
                warned = True
            time.sleep(pause.uniform(0.02, 0.3))
        if handle is not None:
            handle.seek(0)
            handle.truncate()
            handle.write(f"host={socket.gethostname()} pid={os.getpid()}\n")
            handle.flush()
        yield
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def _try_lock(path: Path):
    """The open, locked file, or None when another process holds the lock."""
    try:
        handle = open(path, "a+")
    except PermissionError:  # another user's file: locking a read-only handle works as well
        handle = open(path)
    try:
        os.chmod(path, 0o666)
    except OSError:
        pass
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "holder unknown"
    except OSError:
        return "holder unknown"
