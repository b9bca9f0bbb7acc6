"""metrics.jsonl keeps non-finite values: JSON has no NaN, so they are written as strings and flagged."""

import json
import math

import torch
from composer.core import State
from composer.devices import DeviceCPU
from composer.loggers import Logger

from modernbert_train.train.jsonl_logger import JSONLLogger


def test_non_finite_values_are_written_as_strings_and_flagged(tmp_path):
    path = tmp_path / "metrics.jsonl"
    destination = JSONLLogger(path)
    state = State(model=torch.nn.Linear(1, 1), rank_zero_seed=0, run_name="t", device=DeviceCPU(),
                  max_duration="1ba")  # fmt: skip
    logger = Logger(state, [destination])
    state.timestamp = state.timestamp.to_next_batch(samples=8, tokens=512)
    destination.log_metrics({"loss/train/total": torch.tensor(float("nan")), "lr": 1e-3, "grad": -math.inf})
    destination.batch_end(state, logger)
    destination.fit_end(state, logger)

    line = path.read_text()
    row = json.loads(line)  # strict JSON: no bare NaN
    assert "NaN" not in line and "Infinity" not in line
    assert row["batch"] == 1 and row["lr"] == 1e-3
    assert row["loss/train/total"] == "nan" and math.isnan(float(row["loss/train/total"]))
    assert row["grad"] == "-inf" and float(row["grad"]) == -math.inf
    assert row["non_finite"] == ["loss/train/total", "grad"]


def test_a_non_finite_row_is_written_off_the_log_interval_and_a_stopping_batch_at_close(tmp_path):
    path = tmp_path / "metrics.jsonl"
    destination = JSONLLogger(path, log_every_n_batches=4)
    state = State(model=torch.nn.Linear(1, 1), rank_zero_seed=0, run_name="t", device=DeviceCPU(),
                  max_duration="10ba")  # fmt: skip
    logger = Logger(state, [destination])
    for loss in [2.0, 1.5, float("inf"), 1.2, 1.1]:
        destination.batch_start(state, logger)
        destination.log_metrics({"loss/train/total": loss})
        state.timestamp = state.timestamp.to_next_batch(samples=8, tokens=512)
        destination.batch_end(state, logger)
    # Batch 6 stops the run before its end: only what the guard logged, then the trainer closes.
    destination.batch_start(state, logger)
    destination.log_metrics({"train/grad_norm": float("nan"), "train/skipped_steps": 2})
    destination.close(state, logger)

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["batch"] for row in rows] == [1, 3, 4, 6]  # 1 and every 4th, plus the non-finite ones
    assert rows[1]["loss/train/total"] == "inf" and rows[1]["non_finite"] == ["loss/train/total"]
    assert rows[3] == {
        "batch": 6,
        "train/grad_norm": "nan",
        "train/skipped_steps": 2.0,
        "non_finite": ["train/grad_norm"],
    }
