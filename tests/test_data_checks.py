"""The data checked before training starts: a shard listed but missing, and a stream tokenized with another
tokenizer of the same size and special ids, are one-line errors naming the source."""

import json
import shutil

import pytest

from modernbert_train.train.config import ConfigError, load_config
from modernbert_train.train.data_checks import check_sources


def config_over(write_recipe, *folders):
    recipe = write_recipe(data={"train": [{"local": str(folder)} for folder in folders], "eval": []})
    return load_config(recipe)


def test_the_tiny_data_passes(write_recipe, tiny_data):
    check_sources(config_over(write_recipe, tiny_data / "train"), tiny_data / "tokenizer" / "tokenizer.json")


def test_a_missing_shard_names_source_and_shard(write_recipe, tiny_data, tmp_path):
    copy = shutil.copytree(tiny_data / "train", tmp_path / "train")
    for shard in copy.glob("shard.00000.*"):
        shard.unlink()
    config = config_over(write_recipe, tiny_data / "train", copy)
    with pytest.raises(ConfigError) as error:
        check_sources(config, tiny_data / "tokenizer" / "tokenizer.json")
    assert str(error.value) == (
        f"data.train.1.local: shard shard.00000.mds.zstd listed in {copy / 'index.json'} is missing "
        "(1 shards listed)"
    )


def test_another_tokenizer_of_the_same_size_and_special_ids_is_refused(write_recipe, tiny_data, tmp_path):
    copy = shutil.copytree(tiny_data / "train", tmp_path / "train")
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]  # two ordinary tokens trade ids
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = config_over(write_recipe, tiny_data / "train", copy)
    with pytest.raises(ConfigError, match=r"^data\.train\.1\.local: .* was tokenized with another tokenizer"):
        check_sources(config, tiny_data / "tokenizer" / "tokenizer.json")
