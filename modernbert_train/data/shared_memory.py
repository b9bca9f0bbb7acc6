"""Shared-memory segments that killed runs left behind in /dev/shm.

Streaming names each dataset's segments `<prefix>_<name>` (prefix a six-digit number) and removes them when
the dataset is closed; a killed process cannot, and a later job on the host may then trip over them. A
segment is stale when no process maps it: a live dataset keeps every segment it made mapped. Streaming's own
`clean_stale_shared_memory` removes every segment, also those of runs still going, so it is not used here.

Streaming also registers a dataset's prefix by looking for a free one, then creating it, on every rank on
its own: two jobs that start together on one host can pick the same prefix, and when the later creation fails
its ranks leave the prefix protocol at different barriers and hang (or one rank joins the other job's
prefix). `registration_lock` makes the look-and-create of one job's ranks exclusive on each host. Each rank
also looks for a free prefix on its own, before the leader creates it: another job closing a dataset (which
frees its prefix) between the two looks gave them different prefixes, and the other rank then found none
("prefix=61 was not registered by local leader", seen once in CI). `agreed_shm_prefix`, which streaming's
dataset calls in place of its own (`build_sample_space` installs it), has the ranks of a host take their
local leader's pick.
"""

import contextlib
import fcntl
import functools
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
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
from streaming.base.shared import SharedMemory
from streaming.base.shared import prefix as streaming_prefix
from streaming.base.world import World

from modernbert_train.data.ranks import collective_device, every_rank

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
            if every_rank(handle is not None or not leader):
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
        handle = open(path, "a+")  # noqa: SIM115 (returned open: the lock lasts as long as the handle)
    except PermissionError:  # another user's file: locking a read-only handle works as well
        handle = open(path)  # noqa: SIM115
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666)
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


@contextlib.contextmanager
def _attachments_dropped_after_the_scan() -> Iterator[None]:
    """streaming's free-prefix scan attaches to each existing prefix's segments through its SharedMemory,
    which registers an atexit cleanup that holds the attachment (a file descriptor) for the life of the
    process: every dataset built kept one per segment of every prefix before it, so a process building
    many (the test suite) held O(datasets^2) descriptors and hit the open-file limit. During the scan its
    attachments are made without that registration, and closed as soon as the scan lets go of them."""
    original = streaming_prefix.SharedMemory
    streaming_prefix.SharedMemory = functools.partial(original, auto_cleanup=False)
    try:
        yield
    finally:
        streaming_prefix.SharedMemory = original


def agreed_shm_prefix(
    streams_local: list[str], streams_remote: list[str | None], world: World, retry: int = 100
):
    """streaming 0.13.0's `get_shm_prefix` (same arguments and result: the prefix and the local leader's
    record of its folders), except that only each host's local leader looks for the free prefix and its
    ranks take that one (see the module's docstring). Uses streaming's private helpers, as pinned."""
    streaming_prefix._check_self(streams_local)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    mine = -1
    if world.is_local_leader:
        with _attachments_dropped_after_the_scan():
            mine = max(
                streaming_prefix._check_and_find_retrying(streams_local, streams_remote, name, retry)
                for name in SHM_TO_CLEAN
            )
    if distributed:
        device = collective_device()
        picks = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(picks, torch.tensor([mine], dtype=torch.int64, device=device))
        # streaming's World numbers ranks node by node: the host's leader is its first rank
        prefix_int = int(picks[world.node * world.ranks_per_node].item())
    else:
        prefix_int = mine
    name = streaming_prefix._get_path(prefix_int, LOCALS)
    if world.is_local_leader:
        data = streaming_prefix._pack_locals(streams_local, prefix_int)
        shm = SharedMemory(name, True, len(data))
        shm.buf[: len(data)] = data
    if distributed:
        dist.barrier()
    if not world.is_local_leader:
        try:
            shm = SharedMemory(name, False)
        except FileNotFoundError:
            raise RuntimeError(
                f"data: the local leader registered no shared memory prefix {prefix_int}"
            ) from None
        theirs, their_prefix = streaming_prefix._unpack_locals(bytes(shm.buf))
        if theirs != streams_local or their_prefix != prefix_int:
            raise RuntimeError(
                f"data: the local leader registered prefix {their_prefix} for {theirs}, this rank expected "
                f"{prefix_int} for {streams_local} (ranks given different local folders?)"
            )
    return prefix_int, shm
