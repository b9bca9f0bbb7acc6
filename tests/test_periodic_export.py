"""export.interval: a transformers folder every N batches (<hf_dir>-ba<N>); bad values are one-line errors."""

import pytest
import torch
from conftest import run_train

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
