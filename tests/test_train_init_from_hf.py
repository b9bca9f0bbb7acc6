"""Continued pretraining: `model.init_from_hf` starts a run from a transformers ModernBERT folder."""

import shutil

import pytest
import torch
import transformers
from conftest import read_metrics, run_train

from modernbert_train.train.config import ConfigError, load_config
from modernbert_train.train.main import main

pytestmark = pytest.mark.slow


def released_checkpoint(folder, tiny_data, pad_token_id=3):
    """A transformers ModernBERT saved as a release is: config, safetensors and the tokenizer files."""
    config = transformers.ModernBertConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        global_attn_every_n_layers=2,
        local_attention=16,
        pad_token_id=pad_token_id,
        cls_token_id=1,
        sep_token_id=2,
        global_rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = transformers.ModernBertForMaskedLM(config)
    model.save_pretrained(folder)
    shutil.copy(tiny_data / "tokenizer" / "tokenizer.json", folder / "tokenizer.json")
    return model


def test_run_starts_from_the_released_weights_and_trains(tmp_path, tiny_data, write_recipe):
    hf_model = released_checkpoint(tmp_path / "released", tiny_data)
    recipe = write_recipe(
        max_duration="3ba",
        model={"init_from_hf": str(tmp_path / "released"), "overrides": {"local_rope_theta": 10000.0}},
        export={"hf_dir": str(tmp_path / "hf")},
    )
    from modernbert_train.train.run import build_run

    run = build_run(load_config(recipe))
    ours = run.model.model
    assert ours.config.hidden_size == 32 and ours.config.num_hidden_layers == 3  # the checkpoint's shape
    assert ours.config.mask_token_id == 4  # from the folder's tokenizer: transformers' config has none
    assert ours.config.global_rope_theta == 10000.0  # transformers 5 writes it under rope_parameters
    theirs = hf_model.state_dict()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=0, msg=name)
    run.trainer.close()

    run_train(recipe)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["batch"] for row in rows] == [1, 2, 3]
    trained = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    embedding = "model.embeddings.tok_embeddings.weight"
    assert not torch.equal(trained.state_dict()[embedding], theirs[embedding])  # it trained from there


def test_a_checkpoint_with_other_special_ids_is_refused(tmp_path, tiny_data, write_recipe, capsys):
    released_checkpoint(tmp_path / "released", tiny_data, pad_token_id=0)
    capsys.readouterr()  # transformers 5 saved it with a progress bar on stderr; only the run's output counts
    recipe = write_recipe(model={"init_from_hf": str(tmp_path / "released")})
    with pytest.raises(SystemExit) as exit_info:
        main([str(recipe)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.init_from_hf" in err and "pad_token_id=0" in err and "has 3" in err


def test_a_folder_without_config_is_a_config_error(tmp_path, write_recipe):
    recipe = write_recipe(model={"init_from_hf": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"model.init_from_hf.*no config.json"):
        load_config(recipe)
