"""Streaming's shared-memory segments left by runs killed as a whole process tree are removed when the data
layer next starts; the segments of a run still going are kept."""

import os
import signal
import subprocess
import sys
import time

import pytest

from modernbert_train.data.mixture import build_sample_space
from modernbert_train.data.shared_memory import SHM_FOLDER, mapped_segments

pytestmark = pytest.mark.slow  # two processes started, and segments left to age

HOLD = """
import sys, time
from modernbert_train.data.mixture import build_sample_space
samples = build_sample_space([{"local": sys.argv[1]}], shuffle=False, seed=0)
print(len(samples), flush=True)
time.sleep(300)
"""


def start_holder(train: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, train], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert int(process.stdout.readline()) > 0
    return process


def segments_of(pid: int) -> set[str]:
    """The segments of the dataset `pid` made: those of the newest prefix it maps (streaming also maps the
    segments of older prefixes on the host it looks through)."""
    maps = open(f"/proc/{pid}/maps").read().splitlines()  # noqa: SIM115
    names = {line.rpartition(f"{SHM_FOLDER}/")[2] for line in maps if f" {SHM_FOLDER}/" in line}
    names = {name for name in names if name[:6].isdigit()}
    own = max(name[:6] for name in names)
    return {name for name in names if name.startswith(own)}


def inode(path) -> int | None:
    return path.stat().st_ino if path.exists() else None


def test_killed_runs_segments_are_removed_and_live_ones_kept(tiny_data):
    train = str(tiny_data / "train")
    killed = start_holder(train)
    alive = None
    try:
        left_behind = segments_of(killed.pid)
        assert left_behind
        os.killpg(killed.pid, signal.SIGKILL)  # the whole tree, as a scheduler ends a job
        killed.wait()
        files = {name: (SHM_FOLDER / name).stat().st_ino for name in left_behind}  # they outlive the kill
        time.sleep(5.5)  # older than a segment whose creator may not have mapped it yet

        alive = start_holder(train)  # the next job on the host cleans up as its data layer starts
        # gone: the names are free again (the new job may take the same prefix, with new files). A live
        # process elsewhere on the host (another test's run, under pytest -n 2) may have mapped an old
        # segment while streaming looked through the prefixes: a mapped segment is in use and stays.
        still_there = {name for name, number in files.items() if inode(SHM_FOLDER / name) == number}
        assert still_there <= mapped_segments()
        in_use = segments_of(alive.pid)
        time.sleep(5.5)
        samples = build_sample_space([{"local": train}], shuffle=False, seed=0)
        assert len(samples) > 0
        assert all((SHM_FOLDER / name).exists() for name in in_use)  # a run still going keeps its own
    finally:
        for process in (killed, alive):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait()
