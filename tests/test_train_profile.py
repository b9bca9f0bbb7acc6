"""The `profile` recipe key (train/profiler.py): torch.profiler over whole batches of a real run on rank 0,
summarized to <save_folder>/profile.json and the log, locally or in a bucket, and ended with the run when
the window runs past max_duration; bad values are one line naming the key."""

import json
import subprocess

import pytest
from conftest import REPO, run_env, run_train, train_command

from modernbert_train import storage

pytestmark = pytest.mark.slow


def test_profiled_batches_are_summarized_with_a_trace(write_recipe, tmp_path):
    recipe = write_recipe(
        max_duration="6ba", data={"eval": []}, profile={"start_batch": 3, "batches": 2, "trace": True}
    )
    done = run_train(recipe)
    summary = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert summary["batches"] == [3, 4] and summary["steps"] == 2 and summary["device"] == "cpu"
    assert summary["counted"] == "CPU operators" and summary["device_idle_share"] is None
    # Composer reads the loss and the clock back every batch, the non-finite guard its verdict.
    assert summary["host_reads_per_step"] >= 2
    assert summary["total_ms_per_step"] > 0 and summary["wall_ms_per_step"] > 0
    assert {"aten::mm", "aten::addmm"} & {row["name"] for row in summary["top"]}
    by_kind = sum(kind["ms_per_step"] for kind in summary["by_kind"].values())
    assert abs(by_kind - summary["total_ms_per_step"]) < 1e-6
    assert "traceEvents" in json.loads((tmp_path / "run" / "profile-trace.json").read_text())
    logged = done.stdout + done.stderr
    assert "profile of batches 3-4: " in logged
    assert f"profile: written to {tmp_path / 'run' / 'profile.json'}" in logged


def test_a_window_past_the_end_is_cut_there_and_a_bucket_gets_the_summary(s3_bucket, write_recipe):
    run = storage.join(s3_bucket, "profiled")
    recipe = write_recipe(
        max_duration="4ba", save_folder=run, data={"eval": []}, profile={"start_batch": 3, "batches": 5}
    )
    run_train(recipe)
    summary = json.loads(storage.read_text(storage.join(run, "profile.json")))
    assert summary["batches"] == [3, 4] and summary["steps"] == 2
    assert "profile-trace.json" not in storage.list_files(run)


@pytest.mark.parametrize(
    "override, message",
    [
        ("profile.start_batch=0", "'profile.start_batch' must be at least 1 (the first batch), got 0"),
        ("profile.batches=0", "'profile.batches' must be at least 1, got 0"),
    ],
)
def test_bad_profile_values_are_one_line(write_recipe, override, message):
    done = subprocess.run(
        train_command(write_recipe(), override), cwd=REPO, env=run_env(), capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
