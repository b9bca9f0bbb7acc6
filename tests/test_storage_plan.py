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
    assert rows["train"]["share"] == 0.75 and rows["val"]["tokens_in_run"] == 250_000
    assert rows["val"]["epochs"] == pytest.approx(250_000 / val)
    assert not (tmp_path / "cache").exists()
    assert main(["plan", str(recipe), "--tokens", "1.7e12"]) == 0
    assert "epochs" in capsys.readouterr().out
    # The recipe itself in the bucket, as every path argument may be; a missing one is named.
    storage.upload_file(recipe, storage.join(s3_bucket, "mix.yaml"))
    assert main(["plan", storage.join(s3_bucket, "mix.yaml"), "--tokens", "1e6", "--json"]) == 0
    assert {row["source"] for row in json.loads(capsys.readouterr().out)["sources"]} == {"train", "val"}
    assert main(["plan", storage.join(s3_bucket, "gone.yaml"), "--tokens", "1e6"]) == 2
    assert f"plan {s3_bucket}/gone.yaml: cannot read it: no such file" in capsys.readouterr().err


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
