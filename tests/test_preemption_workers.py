"""SIGTERM to every process of a run, as SLURM signals a job's processes (or a kill of its process group):
the DataLoader workers too, which used to die of it, failing their rank instead of letting it save."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, free_port, read_metrics, run_env

from modernbert_train.train.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow


def test_sigterm_to_the_whole_process_group_with_workers_saves_and_stops(write_recipe, tmp_path):
    recipe = write_recipe(
        max_duration="100000ba", save_interval="100000ba", data={"eval": [], "num_workers": 2}
    )
    folder = tmp_path / "run"
    metrics = folder / "metrics.jsonl"
    command = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", str(free_port())]
    command += ["--stderr", str(tmp_path / "rank{rank}.err"), "--stdout", str(tmp_path / "rank{rank}.out")]
    log = tmp_path / "run.log"
    with log.open("w") as out:
        launcher = subprocess.Popen(
            [*command, "-m", "modernbert_train.train", str(recipe)],
            cwd=REPO, env=run_env(OMP_NUM_THREADS="1"), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert launcher.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for training"
            time.sleep(0.05)
        os.killpg(launcher.pid, signal.SIGTERM)  # the launcher, both ranks and their 4 workers
        began = time.monotonic()
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 60 s after SIGTERM:\n{log.read_text()[-3000:]}")
        # before the launcher's 30 s are up, after which it SIGKILLs the ranks still running
        assert time.monotonic() - began < 25, log.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    output = log.read_text() + (tmp_path / "rank1.err").read_text()
    assert launcher.returncode == EXIT_PREEMPTED, output[-4000:]
    assert "DataLoader worker" not in output
    stopped_at = read_metrics(metrics)[-1]["batch"]
    assert sorted(p.name for p in folder.glob("ep*-rank0.pt")) == [f"ep0-ba{stopped_at}-rank0.pt"]
    assert f"modernbert-train: preempted: stopped at batch {stopped_at}" in output
