"""`modernbert-data plan`: tokens, share and epochs per source, read from local and remote indexes."""

import json

import pytest
import yaml

from data_prep.cli import main
from modernbert_train import storage


def metadata_tokens(folder) -> int:
    return json.loads((folder / "modernbert_data.json").read_text())["tokens"]


def test_plan_reads_each_source_without_downloading_shards(s3_bucket, tiny_data, tmp_path, capsys):
    remote = storage.join(s3_bucket, "val")
    storage.upload_folder(tiny_data / "val", remote)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train": [
        {"name": "train", "local": str(tiny_data / "train"), "proportion": 3},
        {"name": "val", "remote": remote, "local": str(tmp_path / "cache"), "proportion": 1},
    ]}}))  # fmt: skip
    assert main(["plan", str(recipe), "--tokens", "1e6", "--json"]) == 0
    rows = {row["source"]: row for row in json.loads(capsys.readouterr().out)["sources"]}
    train, val = metadata_tokens(tiny_data / "train"), metadata_tokens(tiny_data / "val")
    assert rows["train"]["tokens_available"] == train and rows["val"]["tokens_available"] == val
    # streaming mixes by document: 3:1 of the documents drawn, tokens by each source's mean length.
    train_length, val_length = (mean_length(tiny_data / name) for name in ("train", "val"))
    val_share = val_length / (3 * train_length + val_length)
    assert rows["train"]["documents_share"] == 0.75 and rows["val"]["share"] == pytest.approx(val_share)
    assert rows["val"]["tokens_in_run"] == round(val_share * 1e6)
    assert rows["val"]["epochs"] == pytest.approx(val_share * 1e6 / val)
    assert not (tmp_path / "cache").exists()
    assert main(["plan", str(recipe), "--tokens", "1.7e12"]) == 0
    assert "epochs" in capsys.readouterr().out
    # The recipe itself in the bucket, as every path argument may be; a missing one is named.
    storage.upload_file(recipe, storage.join(s3_bucket, "mix.yaml"))
    assert main(["plan", storage.join(s3_bucket, "mix.yaml"), "--tokens", "1e6", "--json"]) == 0
    assert {row["source"] for row in json.loads(capsys.readouterr().out)["sources"]} == {"train", "val"}
    assert main(["plan", storage.join(s3_bucket, "gone.yaml"), "--tokens", "1e6"]) == 2
    assert f"plan {s3_bucket}/gone.yaml: cannot read it: no such file" in capsys.readouterr().err


def mean_length(folder) -> float:
    metadata = json.loads((folder / "modernbert_data.json").read_text())
    return metadata["tokens"] / metadata["documents"]


def test_plan_takes_choose_and_repeat_as_streaming_draws_them(tiny_data, tmp_path, capsys):
    """`choose` documents (it was taken as repeat 1) and `repeat` x documents, each at its mean length; the
    documents drawn are streaming's own count for the epoch."""
    from modernbert_train.data.mixture import build_sample_space, evaluation_sample_ids

    sources = [
        {"name": "train", "local": str(tiny_data / "train"), "choose": 30},
        {"name": "val", "local": str(tiny_data / "val"), "repeat": 2},
    ]
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"train": sources}))
    assert main(["plan", str(recipe), "--tokens", "1e6", "--json"]) == 0
    rows = {row["source"]: row for row in json.loads(capsys.readouterr().out)["sources"]}
    val_documents = json.loads((tiny_data / "val" / "modernbert_data.json").read_text())["documents"]
    samples = build_sample_space(
        [{k: v for k, v in s.items() if k != "name"} for s in sources], shuffle=False, seed=1
    )
    drawn = evaluation_sample_ids(samples, 0, 0, 1)
    from_train = int((drawn < samples.num_samples - val_documents).sum())
    assert from_train == 30 and len(drawn) - from_train == 2 * val_documents
    assert rows["train"]["documents_share"] == pytest.approx(30 / len(drawn))
    train_tokens = 30 * mean_length(tiny_data / "train")
    val_tokens = 2 * val_documents * mean_length(tiny_data / "val")
    assert rows["train"]["share"] == pytest.approx(train_tokens / (train_tokens + val_tokens))
    recipe.write_text(yaml.safe_dump({"train": [{**sources[0], "repeat": 2}]}))
    assert main(["plan", str(recipe), "--tokens", "1e6"]) == 2
    assert "train.0 gives repeat and choose; give at most one" in capsys.readouterr().err


def test_plan_errors_name_the_source(tiny_data, tmp_path, capsys):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"train": [{"local": str(tmp_path / "absent"), "proportion": 1}]}))
    assert main(["plan", str(recipe), "--tokens", "1e9"]) == 2
    assert "train.0: no modernbert_data.json in" in capsys.readouterr().err
    assert main(["plan", str(recipe), "--tokens", "lots"]) == 2
    assert "--tokens lots: expected a positive number" in capsys.readouterr().err
    assert main(["plan", str(recipe), "--tokens", "inf"]) == 2
    assert "--tokens inf: expected a positive number" in capsys.readouterr().err
    # A negative share was printed as -100% and 200%, exit 0.
    for bad, shown in (("-1", "-1"), ('"lots"', "'lots'")):
        recipe.write_text(f"train: [{{local: {tiny_data / 'train'}, proportion: {bad}}}]")
        assert main(["plan", str(recipe), "--tokens", "1e9"]) == 2
        assert f"train.0.proportion must be a positive number, got {shown}" in capsys.readouterr().err
    recipe.write_text(f"train: [{tiny_data / 'train'}]")
    assert main(["plan", str(recipe), "--tokens", "1e9"]) == 2
    assert "train.0 is not a source" in capsys.readouterr().err


def test_the_2t_mix_recipe_names_remote_streams():
    from conftest import REPO

    sources = yaml.safe_load((REPO / "yamls/data/modernbert-2t-mix.yaml").read_text())["data"]["train"]
    assert all(storage.parse(source["remote"]).scheme == "s3" for source in sources)
    assert sum(source["proportion"] for source in sources) == pytest.approx(1.0)
