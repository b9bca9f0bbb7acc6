"""Preemption: a SIGKILLed run restarted with the same command reproduces the straight run; SIGTERM saves;
save_num_checkpoints_to_keep holds across restarts."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, losses_by_batch, read_metrics, run_env, run_train, train_command

from modernbert_train.train.checkpoint_files import sha256
from modernbert_train.train.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow


def start(command: list[str], log: Path) -> subprocess.Popen:
    """Output to a file: an unread pipe would fill up and stall the run."""
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT)


def wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for training"
        time.sleep(0.05)


def latest_checkpoint(folder: Path) -> str | None:
    link = folder / "latest-rank0.pt"
    return os.readlink(link) if link.is_symlink() else None


def test_sigkill_and_autoresume_reproduce_the_straight_run(write_recipe, tmp_path):
    recipe = write_recipe(max_duration="16ba", autoresume=True, save_interval="4ba", data={"eval": []})
    run_train(recipe, f"save_folder={tmp_path / 'straight'}")
    straight = losses_by_batch(tmp_path / "straight" / "metrics.jsonl")

    folder = tmp_path / "killed"
    log = tmp_path / "killed.log"
    process = start(train_command(recipe, f"save_folder={folder}"), log)
    wait_for(lambda: latest_checkpoint(folder) == "ep0-ba4-rank0.pt", process, log)
    process.kill()
    process.wait()
    assert not (folder / "ep0-ba16-rank0.pt").exists()

    # the row of the checkpointed batch is written before its checkpoint: the kill cannot lose it
    assert 4 in losses_by_batch(folder / "metrics.jsonl")

    run_train(recipe, f"save_folder={folder}")  # the same command again
    resumed = losses_by_batch(folder / "metrics.jsonl")
    # rows the killed run wrote past batch 4 were dropped on resume: one row per batch
    assert [row["batch"] for row in read_metrics(folder / "metrics.jsonl")] == list(range(1, 17))
    assert sorted(resumed) == sorted(straight) == list(range(1, 17))
    for batch, loss in straight.items():
        assert resumed[batch] == pytest.approx(loss, rel=1e-5), f"batch {batch}"


def test_sigterm_saves_a_checkpoint_and_stops(write_recipe, tmp_path):
    hf_dir = tmp_path / "hf"
    recipe = write_recipe(
        max_duration="40ba", save_interval="1000ba", data={"eval": []}, export={"hf_dir": str(hf_dir)}
    )
    folder = tmp_path / "run"
    log = tmp_path / "run.log"
    process = start(train_command(recipe), log)
    metrics = folder / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, process, log)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, log.read_text()[-3000:]
    checkpoints = sorted(folder.glob("ep*-rank0.pt"))
    assert len(checkpoints) == 1
    stopped_at = read_metrics(metrics)[-1]["batch"]
    assert 3 <= stopped_at < 40
    assert checkpoints[0].name == f"ep0-ba{stopped_at}-rank0.pt"
    assert "SIGTERM: saving a checkpoint" in log.read_text()
    assert f"preempted: stopped at batch {stopped_at}" in log.read_text()
    assert not hf_dir.exists()  # a preempted run is not finished: nothing to export


def test_a_local_save_folder_keeps_the_newest_checkpoints_across_a_resume(write_recipe, tmp_path):
    """save_num_checkpoints_to_keep=2 with a checkpoint every batch: the resumed run counts (and deletes) the
    first attempt's checkpoints too; the run's other files (a damaged checkpoint moved aside among them)
    stay."""
    folder = tmp_path / "run"
    recipe = write_recipe(
        autoresume=True, save_interval="1ba", save_num_checkpoints_to_keep=2, data={"eval": []}
    )

    def checkpoints() -> set[str]:
        return {p.name for p in folder.iterdir() if p.name.startswith("ep") and ".bad" not in p.name}

    def with_checksums(*batches: int) -> set[str]:
        return {f"ep0-ba{b}-rank0.pt{suffix}" for b in batches for suffix in ("", ".sha256")}

    run_train(recipe, "max_duration=5ba")
    assert checkpoints() == with_checksums(4, 5)
    for name in ("ep0-ba1-rank0.pt.bad", "ep0-ba1-rank0.pt.bad.sha256"):
        (folder / name).write_text("moved aside by an earlier resume")
    others = {
        p.name: p.read_bytes() for p in folder.iterdir() if p.name not in checkpoints() | {"latest-rank0.pt"}
    }
    assert {"config.yaml", "metrics.jsonl", "ep0-ba1-rank0.pt.bad"} <= set(others)

    run_train(recipe, "max_duration=8ba")
    assert checkpoints() == with_checksums(7, 8)
    for name in ("ep0-ba7-rank0.pt", "ep0-ba8-rank0.pt"):
        assert (folder / f"{name}.sha256").read_text().split()[0] == sha256(folder / name)
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba8-rank0.pt"
    assert [row["batch"] for row in read_metrics(folder / "metrics.jsonl")] == list(range(1, 9))
    assert {p.name for p in folder.iterdir()} == set(others) | checkpoints() | {"latest-rank0.pt"}
    rewritten = {"config.yaml", "metrics.jsonl"}
    assert all((folder / name).read_bytes() == data for name, data in others.items() if name not in rewritten)
