"""The data checked before training starts: a shard listed but missing, and a stream tokenized with another
tokenizer of the same size and special ids (by the identity `shard` records in modernbert_data.json, else its
tokenizer.json copy), are one-line errors naming the source, local or in a bucket."""

import json
import logging
import shutil

import pytest

from modernbert_train import storage
from modernbert_train.data.tokens import IDENTITY_RULE, tokenizer_identity
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
    # Shards from before the identity was recorded: their tokenizer.json copy is compared.
    metadata = json.loads((copy / "modernbert_data.json").read_text())
    del metadata["tokenizer"]["identity"]
    (copy / "modernbert_data.json").write_text(json.dumps(metadata))
    (copy / "tokenizer.json").write_text(swapped_ids((copy / "tokenizer.json").read_text()))
    config = config_over(write_recipe, tiny_data / "train", copy)
    with pytest.raises(ConfigError, match=r"^data\.train\.1\.local: .* was tokenized with another tokenizer"):
        check_sources(config, tiny_data / "tokenizer" / "tokenizer.json")


def swapped_ids(tokenizer_text: str) -> str:
    """The same tokenizer.json with two ordinary tokens' ids traded: same size, same special ids."""
    tokenizer = json.loads(tokenizer_text)
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    return json.dumps(tokenizer)


def test_shard_records_the_identity_and_training_compares_it(write_recipe, tiny_data, tmp_path, caplog):
    tokenizer = tiny_data / "tokenizer" / "tokenizer.json"
    recorded = json.loads((tiny_data / "train" / "modernbert_data.json").read_text())["tokenizer"]
    assert recorded["identity"] == tokenizer_identity(tokenizer.read_text())
    assert recorded["identity_rule"] == IDENTITY_RULE
    # Formatting is not identity: the same tokenizer written another way has the same one.
    assert tokenizer_identity(json.dumps(json.loads(tokenizer.read_text()), indent=4)) == recorded["identity"]
    # What changes the ids beyond the vocabulary is: a lowercasing normalizer, another pre-tokenizer.
    for part, value in (("normalizer", {"type": "Lowercase"}), ("pre_tokenizer", {"type": "Whitespace"})):
        changed = json.loads(tokenizer.read_text())
        changed[part] = value
        assert tokenizer_identity(json.dumps(changed)) != recorded["identity"]

    # The recorded identity decides, with no tokenizer.json beside the shards.
    copy = shutil.copytree(tiny_data / "train", tmp_path / "train")
    (copy / "tokenizer.json").unlink()
    check_sources(config_over(write_recipe, copy), tokenizer)
    metadata = json.loads((copy / "modernbert_data.json").read_text())
    metadata["tokenizer"]["identity"] = tokenizer_identity(swapped_ids(tokenizer.read_text()))
    (copy / "modernbert_data.json").write_text(json.dumps(metadata))
    with pytest.raises(ConfigError) as error:
        check_sources(config_over(write_recipe, tiny_data / "train", copy), tokenizer)
    assert str(error.value) == (
        f"data.train.1.local: {copy} was tokenized with another tokenizer (its tokenizer identity "
        f"recorded in modernbert_data.json differs from the run's {tokenizer} in vocabulary, merges, added "
        "tokens, normalizer, pre-tokenizer or post-processor)"
    )
    # An identity recorded by the older rule (model and added tokens only) is not compared: the copy decides.
    metadata["tokenizer"].pop("identity_rule")
    (copy / "modernbert_data.json").write_text(json.dumps(metadata))
    shutil.copyfile(tokenizer, copy / "tokenizer.json")
    check_sources(config_over(write_recipe, copy), tokenizer)

    # Nothing recorded at all (MDS written by another tool): said, not silent.
    (copy / "modernbert_data.json").unlink()
    (copy / "tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING, logger="modernbert_train.train.data_checks"):
        check_sources(config_over(write_recipe, copy), tokenizer)
    assert f"data.train.0.local: {copy} records no tokenizer" in caplog.text


def test_a_stream_in_a_bucket_is_checked_too(write_recipe, tiny_data, tmp_path, s3_bucket):
    remote = storage.join(s3_bucket, "train")
    storage.upload_folder(tiny_data / "train", remote)
    tokenizer = tiny_data / "tokenizer" / "tokenizer.json"
    source = {"remote": remote, "local": str(tmp_path / "cache")}
    recipe = write_recipe(data={"train": [source], "eval": []})
    check_sources(load_config(recipe), tokenizer)

    metadata = storage.join(remote, "modernbert_data.json")
    storage.write_text(metadata, storage.read_text(metadata).replace('"identity"', '"identity_unused"'))
    storage.write_text(storage.join(remote, "tokenizer.json"), swapped_ids(tokenizer.read_text()))
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


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"tokenizer": "a string"}'])
def test_a_damaged_modernbert_data_json_is_one_line_naming_key_and_file(
    write_recipe, tiny_data, tmp_path, content
):
    from modernbert_train.train.data import recorded_special_ids

    copy = shutil.copytree(tiny_data / "train", tmp_path / "train")
    (copy / "modernbert_data.json").write_text(content)
    config = config_over(write_recipe, copy, tiny_data / "train")
    with pytest.raises(ConfigError) as error:
        recorded_special_ids(config)
    assert str(error.value).startswith(f"data.train.0.local: {copy / 'modernbert_data.json'} is not ")
    assert "\n" not in str(error.value)


def test_a_split_sources_recorded_ids_are_read_from_its_split_folder(write_recipe, tiny_data, tmp_path):
    """`local: ROOT, split: train` reads ROOT/train (as streaming does): its modernbert_data.json there
    decides the special ids and is compared, where ROOT/modernbert_data.json was looked for and, absent,
    both were skipped without a word."""
    from modernbert_train.train.data import check_shards_match, recorded_special_ids, tokenizer_info

    root = tmp_path / "root"
    shutil.copytree(tiny_data / "train", root / "train")
    recipe = write_recipe(data={"train": [{"local": str(root), "split": "train"}], "eval": []})
    config = load_config(recipe)
    recorded = recorded_special_ids(config)
    metadata = json.loads((root / "train" / "modernbert_data.json").read_text())["tokenizer"]
    assert recorded is not None and recorded["mask_id"] == metadata["mask_token_id"]
    info = tokenizer_info(tiny_data / "tokenizer" / "tokenizer.json", recorded)
    check_shards_match(config, info)
    metadata["vocab_size"] += 1
    (root / "train" / "modernbert_data.json").write_text(json.dumps({"tokenizer": metadata}))
    with pytest.raises(ConfigError, match=r"^data\.train\.0\.local: .*/train was tokenized with another"):
        check_shards_match(config, info)
