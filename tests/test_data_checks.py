"""The data checked before training starts: a shard listed but missing, and a stream tokenized with another
tokenizer of the same size and special ids, are one-line errors naming the source, local or in a bucket."""

import json
import shutil

import pytest

from modernbert_train import storage
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


def test_a_stream_in_a_bucket_is_checked_too(write_recipe, tiny_data, tmp_path, s3_bucket):
    remote = storage.join(s3_bucket, "train")
    storage.upload_folder(tiny_data / "train", remote)
    tokenizer = tiny_data / "tokenizer" / "tokenizer.json"
    source = {"remote": remote, "local": str(tmp_path / "cache")}
    recipe = write_recipe(data={"train": [source], "eval": []})
    check_sources(load_config(recipe), tokenizer)

    other = json.loads(tokenizer.read_text())
    vocab = other["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    storage.write_text(storage.join(remote, "tokenizer.json"), json.dumps(other))
    with pytest.raises(ConfigError, match=rf"^data\.train\.0\.remote: {remote} was tokenized with another"):
        check_sources(load_config(recipe), tokenizer)

    storage.write_text(storage.join(remote, "tokenizer.json"), tokenizer.read_text())
    uri = storage.parse(remote)
    for name in storage.list_files(remote):
        if name.startswith("shard.00000."):  # the zstd shard, and its decompressed copy if a run left one
            storage._s3().delete_object(Bucket=uri.bucket, Key=f"{uri.key}/{name}")
    with pytest.raises(ConfigError) as error:
        check_sources(load_config(recipe), tokenizer)
    assert str(error.value) == (
        f"data.train.0.remote: shard shard.00000.mds.zstd listed in {remote}/index.json is missing "
        "(1 shards listed)"
    )
