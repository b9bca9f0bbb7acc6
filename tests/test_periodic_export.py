"""export.interval: a transformers folder every N batches (<hf_dir>-ba<N>); bad values are one-line errors."""

import subprocess

import pytest
import torch
from conftest import REPO, run_env, run_train, train_command

from modernbert_train.hf import from_hf
from modernbert_train.train.config import ConfigError
from modernbert_train.train.periodic_export import periodic_export


@pytest.mark.slow
def test_interval_exports_load_and_the_last_is_the_final_model(write_recipe, tmp_path):
    hf_dir = tmp_path / "hf"
    run_train(write_recipe(max_duration="4ba", export={"hf_dir": str(hf_dir), "interval": "2ba"}))
    final = from_hf(hf_dir).state_dict()
    at_2, at_4 = (from_hf(tmp_path / f"hf-ba{batch}").state_dict() for batch in (2, 4))
    assert all(torch.equal(at_4[key], final[key]) for key in final)
    assert not all(torch.equal(at_2[key], final[key]) for key in final)
    assert sorted(p.name for p in tmp_path.glob("hf*")) == ["hf", "hf-ba2", "hf-ba4"]


@pytest.mark.slow
def test_an_interval_export_into_another_models_folder_stops_the_run_and_leaves_it(write_recipe, tmp_path):
    hf_dir = tmp_path / "hf"
    other = tmp_path / "hf-ba2"
    other.mkdir()
    (other / "pytorch_model.bin").write_text("someone else's weights")
    recipe = write_recipe(max_duration="4ba", export={"hf_dir": str(hf_dir), "interval": "2ba"})
    done = subprocess.run(train_command(recipe), cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert (
        f"export target {other} is not empty and not an earlier export (it holds pytorch_model.bin)" in last
    )
    assert [p.name for p in other.iterdir()] == ["pytorch_model.bin"] and not hf_dir.exists()


@pytest.mark.parametrize(
    "interval, hf_dir, expected",
    [
        ("2ba", None, "export.interval needs export.hf_dir"),
        ("0.5dur", "out", "export.interval='0.5dur': give a positive number of batches"),
        ("often", "out", "export.interval='often': give a positive number of batches"),
        ("0ba", "out", "export.interval='0ba': give a positive number of batches"),
    ],
)
def test_bad_interval_is_a_config_error(interval, hf_dir, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        periodic_export(interval, hf_dir, model=None, tokenizer_file="tokenizer.json")
