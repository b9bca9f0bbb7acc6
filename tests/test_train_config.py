"""Recipe validation: one-line errors naming the file, line and key, before anything heavy runs."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_env, train_command

from modernbert_train.train.config import ConfigError, load_config

# Training recipes; yamls/data/ holds data mixtures (for `modernbert-data plan` and a recipe's data.train).
RECIPES = sorted(
    p
    for p in (REPO / "yamls").rglob("*.yaml")
    if not p.name.endswith("pipeline.yaml") and "data" not in p.relative_to(REPO / "yamls").parts[:1]
)

GOOD = """\
max_duration: 10ba
global_train_batch_size: 8
data:
  train:
    - local: data/default/train
  max_seq_len: 64
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, list(overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_good_recipe_merges_defaults_recipe_and_overrides(tmp_path):
    config = load_config(write(tmp_path, GOOD), ["optimizer.lr=1e-3", "data.train=[{local: a}, {local: b}]"])
    assert config.max_duration == "10ba"
    assert config.optimizer.lr == 1e-3
    assert config.data.mlm_probability == 0.3 and config.data.eval_mlm_probability == 0.15
    assert [s.local for s in config.data.train] == ["a", "b"]


def test_unknown_top_level_key_names_line_and_suggests(tmp_path):
    path = write(tmp_path, GOOD + "save_intervl: 10ba\n")
    assert error_of(path) == f"{path}:7: unknown key 'save_intervl' (did you mean 'save_interval'?)"


def test_unknown_nested_key_names_its_full_path(tmp_path):
    path = write(tmp_path, GOOD + "  mlm_probabilty: 0.2\n")
    assert (
        error_of(path)
        == f"{path}:7: unknown key 'data.mlm_probabilty' (did you mean 'data.mlm_probability'?)"
    )


def test_unknown_key_inside_a_source_list(tmp_path):
    path = write(tmp_path, GOOD.replace("- local: data/default/train", "- locl: data/default/train"))
    assert "unknown key 'data.train[0].locl' (did you mean 'data.train[0].local'?)" in error_of(path)


def test_wrong_type_names_the_key_and_line(tmp_path):
    path = write(tmp_path, GOOD.replace("global_train_batch_size: 8", "global_train_batch_size: eight"))
    message = error_of(path)
    assert message.startswith(f"{path}:2: bad value for 'global_train_batch_size'")


def test_missing_required_value(tmp_path):
    path = write(tmp_path, GOOD.replace("max_duration: 10ba\n", ""))
    assert "missing required value for 'max_duration'" in error_of(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("max_duration", "bad override 'max_duration': expected key=value"),
        ("=3", "bad override '=3': expected key=value"),
        (
            "data.workers=2",
            "override 'data.workers=2': unknown key 'data.workers' (did you mean 'data.num_workers'?)",
        ),
        ("seed=abc", "override 'seed=abc': bad value for 'seed'"),
        ("max_duration=10", "'max_duration' must be a Composer time string"),
        ("precision=bf16", "'precision' must be one of auto, fp32, amp_bf16, amp_fp16"),
        ("optimizer.impl=triton", "'optimizer.impl' must be one of auto, optimi, foreach, got 'triton'"),
        (
            "parallelism.fsdp={} optimizer.impl=optimi",
            "'optimizer.impl' optimi cannot step FSDP-sharded weights",
        ),
        (
            "optimizer.compile=true optimizer.impl=optimi",
            "'optimizer.compile' compiles our multi-tensor step (foreach), not optimi's; use impl auto",
        ),
        ("model.overrides.hiden_size=8", "did you mean 'model.overrides.hidden_size'?"),
        ("model.preset=huge", "'model.preset' 'huge' with model.overrides is not a valid model"),
        ("data.mlm_probability=1.5", "'data.mlm_probability' must be between 0 and 1"),
        ("autoresume=true", "'autoresume' needs run_name and save_folder"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    assert expected in error_of(write(tmp_path, GOOD), *override.split(" "))


def test_a_recipe_in_a_bucket_is_read_and_named_by_its_uri(tmp_path, s3_bucket):
    from modernbert_train import storage

    uri = storage.join(s3_bucket, "recipes", "recipe.yaml")
    storage.upload_file(write(tmp_path, GOOD), uri)
    assert load_config(uri, ["max_duration=3ba"]).max_duration == "3ba"
    storage.upload_file(write(tmp_path, GOOD + "optimzer: {lr: 1.0}\n"), uri)
    assert error_of(uri).startswith(f"{uri}:7: unknown key 'optimzer' (did you mean 'optimizer'?)")
    gone = storage.join(s3_bucket, "recipes", "gone.yaml")
    assert error_of(gone) == f"config file not found: {gone}"


def test_a_recipe_of_the_wrong_shape_or_encoding_is_named(tmp_path):
    """They were an OSError (exit 1), a TypeError with a traceback file, "bad value for '?'" and a decode
    error that named no file."""
    assert error_of(write(tmp_path, "42\n")).endswith("recipe.yaml: a recipe must be a mapping of keys to "
                                                     "values (Invalid loaded object type: int)")  # fmt: skip
    path = write(tmp_path, GOOD + "model:\n  overrides: [x]\n")
    assert error_of(path) == f"{path}:8: 'model.overrides' must be a mapping of keys to values, got a list"
    assert error_of(write(tmp_path, GOOD + "profile: true\n")).endswith(
        "recipe.yaml:7: 'profile' must be a mapping of keys to values, got True"
    )
    assert "'model.overrides' must be a mapping" in error_of(write(tmp_path, GOOD), "model.overrides=[1]")
    path.write_bytes(GOOD.encode() + b"\xff\xfe\n")
    assert error_of(path) == f"{path}:{GOOD.count(chr(10)) + 1}: not UTF-8 text (byte 0xff)"


def test_missing_and_malformed_files(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"
    path = write(tmp_path, "max_duration: [10ba\n")
    assert error_of(path).startswith(f"{path}:2: invalid YAML")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_validates(recipe):
    config = load_config(recipe)
    assert config.data.train and config.max_duration


def test_cli_exits_2_with_one_line_before_importing_composer(tmp_path):
    path = write(tmp_path, GOOD + "save_intervl: 10ba\n")
    done = subprocess.run(train_command(path), cwd=REPO, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"modernbert-train: error: {path}:7: unknown key 'save_intervl' (did you mean 'save_interval'?)"
    ]
    probe = (
        "import sys; from modernbert_train.train.config import load_config; "
        f"load_config({str(write(tmp_path, GOOD))!r}); print('composer' in sys.modules)"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert imported.stdout.strip() == "False"


def test_sharded_checkpoints_in_a_bucket_can_be_autoresumed(tmp_path, s3_bucket):
    # train/start.py finds sharded folders in a bucket too (tests/test_sharded_bucket.py).
    recipe = write(tmp_path, GOOD + "parallelism:\n  fsdp:\n    state_dict_type: sharded\n")
    config = load_config(recipe, ["run_name=r", f"save_folder={s3_bucket}/run", "autoresume=true"])
    assert (config.parallelism.fsdp.state_dict_type, config.autoresume) == ("sharded", True)
