"""SIGTERM to one rank of a 2-process run (gloo, CPU): every rank saves the same checkpoint and stops."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import REPO, free_port, read_metrics, run_env

from modernbert_train.train.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow


def rank_process(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> psutil.Process:
    """The launcher's child for global rank `rank` (its data loader workers, grandchildren, share RANK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children():
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except psutil.Error:
                pass
        assert launcher.poll() is None, "the launcher ended early"
        time.sleep(0.1)
    raise AssertionError(f"no process for rank {rank}")


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_checkpoint(write_recipe, tmp_path):
    hf_dir = tmp_path / "hf"
    recipe = write_recipe(
        max_duration="200ba", save_interval="1000ba", data={"eval": []}, export={"hf_dir": str(hf_dir)}
    )
    folder = tmp_path / "run"
    metrics = folder / "metrics.jsonl"
    command = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", str(free_port())]
    # rank 0's output goes to the launcher's, rank 1's (else discarded) to files of its own
    command += ["--stdout", str(tmp_path / "rank{rank}.out"), "--stderr", str(tmp_path / "rank{rank}.err")]
    command += ["-m", "modernbert_train.train", str(recipe)]
    log = tmp_path / "run.log"
    with log.open("w") as out:
        # its own session: whatever happens, the test ends the launcher and both ranks
        launcher = subprocess.Popen(
            command, cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        rank1 = rank_process(launcher, 1)
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert launcher.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for training"
            time.sleep(0.05)
        rank1.send_signal(signal.SIGTERM)  # rank 1 only: rank 0 hears of it through the ranks' agreement
        try:
            launcher.wait(timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the ranks hung after SIGTERM to rank 1:\n{log.read_text()[-3000:]}")
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    output = log.read_text()
    assert launcher.returncode == EXIT_PREEMPTED, output[-4000:]
    rows = read_metrics(metrics)
    stopped_at = rows[-1]["batch"]
    assert [row["batch"] for row in rows] == list(range(1, stopped_at + 1))  # one row per batch, rank 0's
    assert all(row["samples"] == 8 * row["batch"] for row in rows)
    assert 3 <= stopped_at < 200
    assert sorted(p.name for p in folder.glob("ep*-rank0.pt")) == [f"ep0-ba{stopped_at}-rank0.pt"]
    assert os.readlink(folder / "latest-rank0.pt") == f"ep0-ba{stopped_at}-rank0.pt"
    assert "SIGTERM: saving a checkpoint" in (tmp_path / "rank1.err").read_text()
    assert "SIGTERM on another rank: saving a checkpoint" in output  # rank 0 was not signalled
    assert f"preempted: stopped at batch {stopped_at}" in output
    assert not hf_dir.exists()  # a preempted run is not finished: nothing to export
