"""modernbert-pipeline killed and rerun, as a preemptible cluster does it: a SIGTERM while a phase finishes
stops the pipeline before the next phase (75); a SIGKILL in the next phase's first batches reruns it from the
previous phase's end, exactly; a finished phase extended after the next one started is refused."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO, losses_by_batch, run_env

pytestmark = pytest.mark.slow


def write_pipeline(tmp_path, write_recipe, export: bool = False):
    """Two phases of 4 batches (checkpoints every 2); the second a decay at its own lr."""
    write_recipe(tmp_path / "recipe.yaml", max_duration="4ba", save_interval="2ba", data={"eval": []})
    first = [f"save_folder={tmp_path / 'p1'}", "run_name=p1"]
    if export:
        first.append(f"export.hf_dir={tmp_path / 'hf1'}")
    second = [
        f"save_folder={tmp_path / 'p2'}",
        "run_name=p2",
        "optimizer.lr=1e-3",
        "scheduler.t_warmup=0ba",
        "scheduler.t_decay=1dur",
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"phases": [
        {"recipe": "recipe.yaml", "overrides": first},
        {"recipe": "recipe.yaml", "overrides": second},
    ]}))  # fmt: skip
    return path


def command(path) -> list[str]:
    return [sys.executable, "-m", "modernbert_train.train.pipeline", str(path)]


def run_pipeline(path) -> subprocess.CompletedProcess:
    return subprocess.run(command(path), cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)


def run_until(path, ready, sig: int) -> subprocess.CompletedProcess:
    """Start the pipeline and send `sig` to it once `ready()` holds; its completed process."""
    process = subprocess.Popen(
        command(path), cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.005)
    if process.poll() is None:
        os.kill(process.pid, sig)
    out, err = process.communicate(timeout=240)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def optimizer_state(checkpoint) -> dict:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]
    return {"model": saved["model"], "optimizer": saved["optimizers"]["StableAdamW"]}


def assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            other = b["optimizer"]["state"][name][key]
            same = torch.equal(value, other) if torch.is_tensor(value) else value == other
            assert same, (name, key)
    steps = [[int(g["step"]) for g in o["param_groups"]] for o in (a["optimizer"], b["optimizer"])]
    assert steps[0] == steps[1]


def test_sigterm_while_phase_1_finishes_stops_before_phase_2_and_a_sigkill_in_phase_2_reruns_it(
    tmp_path, write_recipe
):
    straight = tmp_path / "straight"
    straight.mkdir()
    done = run_pipeline(write_pipeline(straight, write_recipe))
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "run"
    run.mkdir()
    path = write_pipeline(run, write_recipe, export=True)
    # Phase 1's final checkpoint is saved and it is exporting: the scheduler's notice arrives now. It was
    # swallowed: phase 1 ended with 0 and phase 2 trained on, to be SIGKILLed at the end of the grace period.
    stopped = run_until(path, lambda: (run / "p1" / "ep0-ba4-rank0.pt").exists(), signal.SIGTERM)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        "modernbert-pipeline: preempted: SIGTERM after phase 1 finished; phase 2 did not start: rerun the "
        "same command to go on"
    )
    assert not (run / "p2").exists()

    # A SIGKILL in phase 2's first batch, before its first checkpoint.
    metrics = run / "p2" / "metrics.jsonl"
    killed = run_until(path, lambda: metrics.exists() and metrics.stat().st_size > 0, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not [name for name in os.listdir(run / "p2") if name.startswith("ep")]

    done = run_pipeline(path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "hf1" / "config.json").is_file()
    for phase in ("p1", "p2"):  # phase 2 again from phase 1's end: moments carried, its clock from 0
        assert losses_by_batch(run / phase / "metrics.jsonl") == losses_by_batch(
            straight / phase / "metrics.jsonl"
        )
        for name in ("ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt"):
            assert_same(optimizer_state(run / phase / name), optimizer_state(straight / phase / name))
    assert [
        g["step"] for g in optimizer_state(run / "p2" / "ep0-ba4-rank0.pt")["optimizer"]["param_groups"]
    ] == [8, 8]


def test_a_finished_phase_extended_after_the_next_one_started_is_refused(tmp_path, write_recipe):
    path = write_pipeline(tmp_path, write_recipe)
    done = run_pipeline(path)
    assert done.returncode == 0, done.stderr[-3000:]
    before = sorted(os.listdir(tmp_path / "p1"))
    pipeline = yaml.safe_load(path.read_text())
    pipeline["phases"][0]["overrides"].append("max_duration=6ba")
    path.write_text(yaml.safe_dump(pipeline))
    # It trained phase 1 on to 6ba, then phase 2 said "complete": its model never saw those batches.
    refused = run_pipeline(path)
    assert refused.returncode == 2
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    assert refused.stderr.strip().splitlines() == [
        f"modernbert-pipeline: error: phase 1 ({p1}) is at 4ba, below its max_duration 6ba, but phase 2 "
        f"already started from its earlier end ({p2} holds checkpoints) and would not see the rest: put "
        "phase 1's max_duration back, or move the later phases' save_folders away to redo them from its new "
        "end"
    ]
    assert sorted(os.listdir(tmp_path / "p1")) == before
    # Phase 1's checkpoints gone (moved away): it would train again from scratch, phase 2 resume its own.
    pipeline["phases"][0]["overrides"].remove("max_duration=6ba")
    path.write_text(yaml.safe_dump(pipeline))
    (tmp_path / "p1").rename(tmp_path / "p1-moved")
    refused = run_pipeline(path)
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"modernbert-pipeline: error: phase 1 ({p1}) holds no checkpoint, but phase 2 already started"
        )
    )
    assert not (tmp_path / "p1").exists()
