"""The run's two metric records agree: metrics.jsonl keeps every evaluation whatever the log interval, and
with two ranks one W&B run (rank 0's) holds the same losses and evaluations, at Composer's steps."""

import json
import subprocess
import sys

import pytest
import torch
from composer.core import State
from composer.devices import DeviceCPU
from composer.loggers import Logger
from conftest import REPO, free_port, read_metrics, run_env
from test_train_wandb import needs_wandb, read_records

from modernbert_train.train.checkpoint import checkpoint_summary
from modernbert_train.train.jsonl_logger import JSONLLogger


def seven_batches(path, before_checkpoint):
    """JSONLLogger (every 4th batch) through 7 batches as Composer drives it, `before_checkpoint(destination,
    state, logger, batch)` called between each batch's end and its checkpoint event."""
    destination = JSONLLogger(path, log_every_n_batches=4)
    state = State(model=torch.nn.Linear(1, 1), rank_zero_seed=0, run_name="t", device=DeviceCPU(),
                  max_duration="7ba")  # fmt: skip
    logger = Logger(state, [destination])
    for batch in range(1, 8):
        destination.batch_start(state, logger)
        destination.log_metrics({"loss/train/total": 1.0 / batch})
        state.timestamp = state.timestamp.to_next_batch(samples=8, tokens=512)
        destination.batch_end(state, logger)
        before_checkpoint(destination, state, logger, batch)
        destination.batch_checkpoint(state, logger)
    return destination, state, logger


def test_an_evaluation_off_the_log_interval_is_written(tmp_path):
    path = tmp_path / "metrics.jsonl"

    def evaluate_every_third(destination, state, logger, batch):  # eval_interval: 3ba
        if batch % 3 == 0:
            destination.log_metrics({"metrics/eval/MLMLoss": 2.0 / batch})

    destination, state, logger = seven_batches(path, evaluate_every_third)
    destination.fit_end(state, logger)

    rows = read_metrics(path)
    assert [row["batch"] for row in rows] == [1, 3, 4, 6, 7]
    assert {row["batch"]: row.get("metrics/eval/MLMLoss") for row in rows if row["batch"] % 3 == 0} == {
        3: pytest.approx(2 / 3),
        6: pytest.approx(2 / 6),
    }


def test_the_evaluation_after_fit_end_joins_the_last_row(tmp_path):
    """A last batch off eval_interval: Composer evaluates once more after FIT_END, once the last batch's row
    is written (before its checkpoint); those metrics join that row, which keeps its training loss."""
    path = tmp_path / "metrics.jsonl"

    def write_before_save(destination, state, logger, batch):
        destination.writer_before_save().batch_checkpoint(state, logger)

    destination, state, logger = seven_batches(path, write_before_save)
    destination.log_metrics({"time/batch": 7})  # Composer's final counters, then FIT_END, then the eval
    destination.fit_end(state, logger)
    destination.log_metrics({"metrics/eval/MLMLoss": 0.5, "metrics/eval/MLMAccuracy": 0.25})
    destination.close(state, logger)

    rows = read_metrics(path)
    assert [row["batch"] for row in rows] == [1, 4, 7]
    assert rows[-1] == {
        "batch": 7,
        "loss/train/total": pytest.approx(1 / 7),
        "samples": 56,
        "tokens": 3584,
        "metrics/eval/MLMLoss": 0.5,
        "metrics/eval/MLMAccuracy": 0.25,
    }


def wandb_history(wandb_dir) -> tuple[str, dict[int, dict[str, float]]]:
    """The one offline W&B run under `wandb_dir`: its id and its metrics by step."""
    (run_file,) = (wandb_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run_id, steps = None, {}
    for record in read_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            steps.setdefault(record.history.step.num, {}).update(items)
    return run_id, steps


@pytest.mark.slow
@needs_wandb
def test_two_ranks_log_one_wandb_run_that_agrees_with_metrics_jsonl(write_recipe, tmp_path):
    recipe = write_recipe(
        max_duration="5ba",
        log_interval="4ba",
        eval_interval="3ba",  # at batch 3, and after FIT_END for the last, 5
        eval_subset_num_batches=1,
        save_interval="5ba",
        loggers={"wandb": {"project": "mbt-test", "mode": "offline"}},
    )
    launcher = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", str(free_port())]
    done = subprocess.run(
        [*launcher, "-m", "modernbert_train.train", str(recipe)],
        cwd=REPO,
        env=run_env(WANDB_DIR=str(tmp_path), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    run_id, steps = wandb_history(tmp_path)  # one run: rank 1 logs nowhere
    assert checkpoint_summary(tmp_path / "run" / "ep0-ba5-rank0.pt").wandb_run_id == run_id
    rows = {row["batch"]: row for row in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    evaluated = sorted(step for step, items in steps.items() if "metrics/eval/MLMLoss" in items)
    assert evaluated == [3, 5]
    assert sorted(rows) == [1, 3, 4, 5]  # the log interval's, the last, and every evaluation's
    for batch, row in rows.items():
        # Composer logs batch b's loss at step b - 1 (before its clock counts the batch), the rest at step b.
        assert steps[batch - 1]["loss/train/total"] == pytest.approx(row["loss/train/total"])
        assert steps[batch]["lr-StableAdamW/group0"] == pytest.approx(row["lr-StableAdamW/group0"])
        if batch in evaluated:
            assert steps[batch]["metrics/eval/MLMLoss"] == pytest.approx(row["metrics/eval/MLMLoss"])
