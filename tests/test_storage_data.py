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


def test_inputs_and_the_tokenizer_from_a_bucket_shard_as_from_local_files(
    s3_bucket, tiny_data, tmp_path, monkeypatch, capsys
):
    """--input and --tokenizer take URIs (an object, or a prefix as a folder), as every path argument does:
    the same documents, tokens and ids as from the local files; reports name the objects."""
    monkeypatch.chdir(tmp_path)
    corpus, tokenizer = tiny_data / "corpus", tiny_data / "tokenizer"
    raw = storage.join(s3_bucket, "raw")
    storage.upload_file(corpus / "val.jsonl", storage.join(raw, "val.jsonl"))
    storage.upload_file(corpus / "train.jsonl", storage.join(raw, "more", "train.jsonl"))
    storage.write_text(storage.join(raw, "broken.jsonl"), '{"text": "fine"}\n{not json\n')
    storage.upload_folder(tokenizer, storage.join(s3_bucket, "tok"))

    local = ["--input", str(corpus / "val.jsonl"), str(corpus / "train.jsonl"), "--text-field", "text"]
    common = ["--workers", "1"]
    assert main(["shard", *local, "--output", "local", "--tokenizer", str(tokenizer), *common]) == 0
    remote = ["--input", storage.join(raw, "val.jsonl"), storage.join(raw, "more"), "--text-field", "text"]
    uri_tokenizer = storage.join(s3_bucket, "tok")
    assert main(["shard", *remote, "--output", "remote", "--tokenizer", uri_tokenizer, *common]) == 0
    mine, theirs = (
        json.loads((tmp_path / name / "modernbert_data.json").read_text()) for name in ("remote", "local")
    )
    assert (mine["documents"], mine["tokens"]) == (theirs["documents"], theirs["tokens"])
    assert mine["sources"] == {"val": theirs["sources"]["val"], "more": theirs["sources"]["train"]}
    assert {k: v for k, v in mine["tokenizer"].items() if k != "from"} == {
        k: v for k, v in theirs["tokenizer"].items() if k != "from"
    } and mine["tokenizer"]["from"] == uri_tokenizer

    # A prefix as a folder, the bad record named by its object; the tokenizer as an object.
    capsys.readouterr()
    tokenizer_object = storage.join(s3_bucket, "tok", "tokenizer.json")
    assert main(["shard", "--input", raw, "--output", "all", "--tokenizer", tokenizer_object, *common]) == 0
    assert f"invalid JSON (at {storage.join(raw, 'broken.jsonl')}:2)" in capsys.readouterr().err
    assert (
        json.loads((tmp_path / "all" / "modernbert_data.json").read_text())["sources"]["raw"]["documents"]
        == 441
    )
    for argv, problem in [
        (["--input", storage.join(s3_bucket, "nothing")], "no such object, nor objects under it"),
        (["--input", raw, "--tokenizer", storage.join(s3_bucket, "none.json")], "none.json does not exist"),
    ]:
        argv = [
            "shard",
            *argv,
            "--output",
            "x",
            *(["--tokenizer", str(tokenizer)] * ("--tokenizer" not in argv)),
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert problem in err and err.count("\n") == 1, err
    # An output inside an input prefix would read its own shards back.
    assert (
        main(["shard", "--input", raw, "--output", storage.join(raw, "out"), "--tokenizer", str(tokenizer)])
        == 2
    )
    assert "lies inside --input" in capsys.readouterr().err
