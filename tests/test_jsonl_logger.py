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
