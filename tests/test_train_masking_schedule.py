"""data.mlm_probability as a schedule: recipe checks, times turned into batch indices, a run that logs it."""

import pytest
from conftest import read_metrics, run_train
from test_train_config import GOOD, error_of, write

from modernbert_train.data import MaskingSchedule, batch_size_schedule
from modernbert_train.train.config import ConfigError, load_config
from modernbert_train.train.data import masking_schedule

ROWS = batch_size_schedule(global_batch_size=8, max_seq_len=64, micro_batch_size=8)


def schedule_of(tmp_path, *overrides: str) -> MaskingSchedule:
    return masking_schedule(load_config(write(tmp_path, GOOD), list(overrides)), ROWS)


def test_a_number_is_a_constant_ratio(tmp_path):
    assert schedule_of(tmp_path, "data.mlm_probability=0.25") == MaskingSchedule((0.25,))


def test_times_become_batch_indices_or_rows_trained(tmp_path):
    # GOOD: max_duration 10ba, 8 rows of 64 slots per batch
    linear = schedule_of(
        tmp_path, "data.mlm_probability={schedule: linear, start: 0.3, end: 0.15, t_start: 0.5dur}"
    )
    assert linear == MaskingSchedule((0.3, 0.15), (5, 10), "linear")
    # sp and tok count rows trained (2048 slots = 32 rows), which a resume with another batch size keeps
    step = schedule_of(
        tmp_path,
        "data.mlm_probability={schedule: step, values: [0.3, 0.2, 0.1], milestones: [16sp, 2048tok]}",
    )
    assert step == MaskingSchedule((0.3, 0.2, 0.1), (16, 32), "step", "row")
    rows = schedule_of(
        tmp_path, "max_duration=6400tok", "data.mlm_probability={schedule: linear, start: 0.3, end: 0.1}"
    )
    assert rows == MaskingSchedule((0.3, 0.1), (0, 100), "linear", "row")  # 0ba is 0 rows; 1dur 6400 slots
    # ba mixed with sp/tok: batch indices of this recipe's batch sizes (16 rows = 2 batches)
    mixed = schedule_of(
        tmp_path, "data.mlm_probability={schedule: step, values: [0.3, 0.2, 0.1], milestones: [1ba, 16sp]}"
    )
    assert mixed == MaskingSchedule((0.3, 0.2, 0.1), (1, 2), "step")
    assert schedule_of(tmp_path, "data.mlm_probability={schedule: constant, value: 0.2}").rate(7) == 0.2


def test_token_times_follow_the_batch_size_warmup():
    rows = batch_size_schedule(
        global_batch_size=8,
        max_seq_len=64,
        micro_batch_size=2,
        batch_size_warmup={"start": 2, "tokens": 2048},
    )
    sizes = [rows.rows(k) for k in range(40)]
    for target in (1, 2, 3, 10, 40, 41, 64):
        k = rows.batches_until(target)
        assert sum(sizes[:k]) >= target > sum(sizes[: k - 1]) if k else target <= 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.2", "'data.mlm_probability' must be between 0 and 1, got 1.2"),
        ("[0.3]", "'data.mlm_probability' must be a ratio or a schedule"),
        (
            "{schedule: cosine}",
            "'data.mlm_probability.schedule' must be one of constant, linear, step, got 'cosine'",
        ),
        ("{schedule: linear, start: 0.3}", "'data.mlm_probability.end' is required by a linear schedule"),
        (
            "{schedule: linear, start: 0.3, end: 0.1, t_stop: 1dur}",
            "'data.mlm_probability.t_stop' is not a key of a linear schedule",
        ),
        (
            "{schedule: linear, start: 0.3, end: 0}",
            "'data.mlm_probability.end' must be a ratio between 0 and 1",
        ),
        (
            "{schedule: linear, start: 0.3, end: 0.1, t_end: 2ep}",
            "'data.mlm_probability.t_end' must be a time in ba, sp, tok or dur",
        ),
        (
            "{schedule: step, values: [0.3, 0.2], milestones: [5ba, 8ba]}",
            "'data.mlm_probability.values' needs one entry more than milestones (2), got 2",
        ),
        (
            "{schedule: step, values: [0.3, 2], milestones: [5ba]}",
            "'data.mlm_probability.values.1' must be a ratio between 0 and 1",
        ),
    ],
)
def test_bad_schedules_are_one_line_errors_naming_the_key(tmp_path, value, expected):
    assert expected in error_of(write(tmp_path, GOOD), f"data.mlm_probability={value}")


def test_bad_schedule_in_the_recipe_names_its_line(tmp_path):
    recipe = GOOD + "  mlm_probability:\n    schedule: linear\n    start: 0.3\n    end: 1.5\n"
    assert "recipe.yaml:10: 'data.mlm_probability.end' must be a ratio" in error_of(write(tmp_path, recipe))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "{schedule: linear, start: 0.3, end: 0.1, t_start: 8ba, t_end: 0.5dur}",
            "data.mlm_probability.t_start: comes after t_end (batch 8 > batch 5)",
        ),
        (
            "{schedule: step, values: [0.3, 0.2, 0.1], milestones: [6ba, 0.5dur]}",
            "data.mlm_probability.milestones.1: comes before the milestone ahead of it",
        ),
    ],
)
def test_times_out_of_order_are_one_line_errors(tmp_path, value, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        schedule_of(tmp_path, f"data.mlm_probability={value}")


def test_dur_needs_a_max_duration_in_batches_samples_or_tokens(tmp_path):
    with pytest.raises(ConfigError, match="'dur' time needs max_duration in ba, sp or tok, got 1ep"):
        schedule_of(
            tmp_path, "max_duration=1ep", "data.mlm_probability={schedule: linear, start: 0.3, end: 0.1}"
        )


def test_a_run_masks_at_the_scheduled_ratio_and_logs_it(write_recipe, tmp_path):
    recipe = write_recipe(
        max_duration="8ba",
        data={"mlm_probability": {"schedule": "step", "values": [0.4, 0.1], "milestones": ["4ba"]}},
    )
    run_train(recipe)
    rows = {row["batch"]: row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "batch" in row}
    # Composer's batch b (1-based) is the data's global batch b - 1
    assert [rows[b]["data/mlm_probability"] for b in range(1, 9)] == [0.4] * 4 + [0.1] * 4
