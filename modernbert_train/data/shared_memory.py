"""Shared-memory segments that killed runs left behind in /dev/shm.

Streaming names each dataset's segments `<prefix>_<name>` (prefix a six-digit number) and removes them when
the dataset is closed; a killed process cannot, and a later job on the host may then trip over them. A
segment is stale when no process maps it: a live dataset keeps every segment it made mapped. Streaming's own
`clean_stale_shared_memory` removes every segment, also those of runs still going, so it is not used here.
"""

import os
import re
import time
from pathlib import Path

from streaming.base.constant import SHM_TO_CLEAN

SHM_FOLDER = Path("/dev/shm")
_STREAMING_SEGMENT = re.compile(rf"^\d{{6}}_({'|'.join(SHM_TO_CLEAN)})$")


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
