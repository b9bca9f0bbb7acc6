"""Recipe values that used to pass validation and fail (or do nothing) later: one-line errors up front."""

import pytest
from test_train_config import GOOD, error_of, write


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.train={local: a}", "'data.train' must be a list, got a mapping"),
        (
            "device_train_microbatch_size=16",
            "'device_train_microbatch_size' must be at most the batch per rank",
        ),
        ("save_interval=0ba", "'save_interval' must be positive, got '0ba' (it would never save)"),
        ("max_duration=0ba", "'max_duration' must be positive, got '0ba' (nothing would train)"),
        ("max_duration=0.0dur", "'max_duration' must be positive"),
        ("data.lookahead=0", "'data.lookahead' must be at least 1 (chunks buffered for packing), got 0"),
        # Composer's clipping scales by max_norm / norm: a negative max_norm flips every gradient.
        ("grad_clip_norm=-1.0", "'grad_clip_norm' must be positive (null: no clipping), got -1.0"),
        ("grad_clip_norm=0", "'grad_clip_norm' must be positive"),
        ("eval_subset_num_batches=0", "'eval_subset_num_batches' must be a batch count, or -1 for the whole"),
        ("eval_subset_num_batches=-2", "eval split; got -2"),
        ("speed_window=0", "'speed_window' must be at least 1 batch, got 0"),
        (
            "data.eval_batch_size=0",
            "'data.eval_batch_size' must be at least 1 row (null: the micro-batch size)",
        ),
        ("dist_timeout=-1", "'dist_timeout' must be a positive number of seconds, got -1"),
        ("model.overrides.global_rope_theta=.nan", "global_rope_theta=nan must be a positive, finite number"),
    ],
)
def test_config_gaps_are_one_line_errors(tmp_path, override, expected):
    assert expected in error_of(write(tmp_path, GOOD), override)


def test_data_train_as_a_mapping_in_the_recipe_names_the_line(tmp_path):
    recipe = GOOD.replace("    - local: data/default/train", "    local: data/default/train")
    assert "recipe.yaml:4: 'data.train' must be a list, got a mapping" in error_of(write(tmp_path, recipe))


def test_micro_batch_is_checked_against_each_ranks_share(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as the Composer launcher sets it
    assert "(8 / 2 = 4, WORLD_SIZE from the environment), got 8" in error_of(
        write(tmp_path, GOOD), "device_train_microbatch_size=8"
    )
    for bad in ("0", "abc", ""):
        monkeypatch.setenv("WORLD_SIZE", bad)
        assert error_of(write(tmp_path, GOOD)) == (
            f"environment variable WORLD_SIZE={bad!r}: expected the number of ranks (1 or more)"
        )


def test_a_home_relative_path_is_expanded_where_no_shell_did(tmp_path, monkeypatch):
    """`save_folder=~/run` as an override (bash expands no ~ after `key=`) or in YAML made a folder `~`."""
    from modernbert_train.train.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = write(tmp_path, GOOD.replace("    - local: data/default/train", "    - local: ~/shards"))
    (tmp_path / "shards").mkdir()
    config = load_config(recipe, ["save_folder=~/run", "data.tokenizer=~/tok.json"])
    assert config.save_folder == str(tmp_path / "run") and config.data.tokenizer == str(tmp_path / "tok.json")
    assert config.data.train[0].local == str(tmp_path / "shards")


def test_a_warmup_starting_below_one_micro_batch_per_rank_is_refused_at_a_fresh_start(write_recipe, capsys):
    """The batch grows by whole micro-batches on every rank: the warmup would start at one (here 4 rows, not
    the recipe's 2) without a word. A resume, which cannot change the start, only warns."""
    from modernbert_train.train.main import main

    recipe = write_recipe(
        device_train_microbatch_size=4, data={"batch_size_warmup": {"start": 2, "tokens": "1000tok"}}
    )
    with pytest.raises(SystemExit) as exited:
        main([str(recipe)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "modernbert-train: error: data.batch_size_warmup start=2 is below one micro-batch on every rank "
        "(1 rank(s) x 4 rows = 4), where the batch starts instead: set start to 4 or more, or lower "
        "device_train_microbatch_size"
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="flash may be usable on a GPU")
def test_a_forced_attention_backend_that_cannot_train_here_is_refused_before_training(write_recipe, capsys):
    """It was accepted, then failed at the first forward with exit 1 and a traceback file."""
    from modernbert_train.train.main import main

    with pytest.raises(SystemExit) as exited:
        main([str(write_recipe()), "model.attn_backend=flash"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("modernbert-train: error: model config: attn_backend='flash' needs the flash")
