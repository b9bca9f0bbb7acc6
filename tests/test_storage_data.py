"""`modernbert-data` with URI outputs and inputs, against the real S3 server the suite starts."""

import json
import os

from data_prep.cli import main
from modernbert_train import storage


def shard_args(tiny_data, output: str, *extra: str) -> list[str]:
    corpus = tiny_data / "corpus" / "val.jsonl"
    tokenizer = tiny_data / "tokenizer"
    return [
        "shard",
        "--input",
        str(corpus),
        "--output",
        output,
        "--tokenizer",
        str(tokenizer),
        "--workers",
        "1",
    ]


def test_shard_to_s3_then_inspect_and_rerun(s3_bucket, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a URI must never become a local folder named 's3:'
    output = storage.join(s3_bucket, "datasets", "val")
    assert main(shard_args(tiny_data, output)) == 0
    names = storage.list_files(output)
    assert {"index.json", "modernbert_data.json", "tokenizer.json"} <= set(names)
    assert any(name.endswith(".mds.zstd") for name in names)
    assert not os.listdir(tmp_path)

    capsys.readouterr()
    assert main(["inspect", output, "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(tiny_data / "val"), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert remote["path"] == output
    assert {k: v for k, v in remote.items() if k != "path"} == {k: v for k, v in local.items() if k != "path"}

    # A requeued task: the finished output is left alone.
    assert main(shard_args(tiny_data, output)) == 0
    assert "nothing to do" in capsys.readouterr().out
    # Other inputs into a finished output are refused without --overwrite.
    other = shard_args(tiny_data, output)
    other[2] = str(tiny_data / "corpus" / "train.jsonl")
    assert main(other) == 2
    assert "already holds a dataset sharded from other inputs" in capsys.readouterr().err


def test_interrupted_upload_is_redone(s3_bucket, tiny_data, capsys):
    output = storage.join(s3_bucket, "val")
    storage.write_text(storage.join(output, "shard.00000.mds.zstd"), "left by a killed upload")
    assert main(shard_args(tiny_data, output)) == 0
    assert "index.json" in storage.list_files(output)
    capsys.readouterr()
    assert main(["inspect", output, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 40


def test_bad_uris_are_one_line_errors_before_any_work(s3_server, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["inspect", "s3://no-such-bucket/x"], "bucket 'no-such-bucket' does not exist"),
        (["inspect", "ftp://host/x"], "unsupported scheme 'ftp://'"),
        (shard_args(tiny_data, "s3://Bad_Name/x"), "not a valid S3 bucket name"),
        (shard_args(tiny_data, "s3://no-such-bucket/x"), "bucket 'no-such-bucket' does not exist"),
    ]
    for argv, problem in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert problem in err and err.count("\n") == 1, err
    capsys.readouterr()
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing answers
    assert main(shard_args(tiny_data, "s3://bucket/x")) == 2
    err = capsys.readouterr().err
    assert "--output s3://bucket/x: cannot check at http://127.0.0.1:9" in err and err.count("\n") == 1
    assert not os.listdir(tmp_path)
