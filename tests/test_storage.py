"""modernbert_train.storage against local folders and the real S3 API server (moto) the suite starts."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from modernbert_train import storage
from modernbert_train.storage import StorageError


@pytest.mark.parametrize(
    "uri, problem",
    [
        ("s3://", "no bucket name"),
        ("s3:///key", "no bucket name"),
        ("s3://Bad_Bucket/key", "not a valid S3 bucket name"),
        ("s3://bucket/a//b", "empty path segment"),
        ("ftp://host/file", "unsupported scheme 'ftp://'"),
        ("http://host/data", "unsupported scheme 'http://'"),
        # Composer reads it as s3 with no bucket; a local folder named 's3:' it is not either.
        ("s3:/bucket/key", "one slash after 's3:'; a URI is s3://bucket/path"),
    ],
)
def test_malformed_or_unsupported_uris_are_one_line_errors(uri, problem):
    with pytest.raises(StorageError) as caught:
        storage.parse(uri, "--output")
    message = str(caught.value)
    assert message.startswith(f"--output {uri}:") and problem in message and "\n" not in message


def test_uri_parts_and_join():
    assert storage.parse("s3://bucket/a/b/") == storage.Uri("s3", "bucket", "a/b")
    assert storage.join("s3://bucket/run/", "ckpt", "x.pt") == "s3://bucket/run/ckpt/x.pt"
    assert storage.join("s3://bucket", "x.pt") == "s3://bucket/x.pt"
    assert storage.join("runs/a", "x.pt") == "runs/a/x.pt"
    assert storage.is_uri("gs://b/k") and storage.is_uri("weird://x") and not storage.is_uri("runs/s3:/b")


def test_a_path_that_names_a_file_or_the_folder_holding_it(tmp_path):
    """One rule for "a tokenizer.json, or a folder holding one", local or URI."""
    (tmp_path / "tok").mkdir()
    assert storage.file_in(tmp_path / "tok", "tokenizer.json") == tmp_path / "tok" / "tokenizer.json"
    assert storage.file_in(tmp_path / "other.json", "tokenizer.json") == tmp_path / "other.json"
    assert storage.file_in("s3://bkt/tok/", "tokenizer.json") == "s3://bkt/tok/tokenizer.json"
    assert storage.file_in("s3://bkt/tok/mine.json", "tokenizer.json") == "s3://bkt/tok/mine.json"


def test_round_trip_through_s3(s3_bucket, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.bin").write_bytes(b"\0\1\2")
    (folder / "index.json").write_text("{}")
    remote = storage.join(s3_bucket, "data", "set")
    storage.check(remote, "--output")
    storage.upload_folder(folder, remote, last=["index.json"])
    assert storage.list_files(remote) == ["a.txt", "index.json", "sub/b.bin"]
    assert storage.exists(storage.join(remote, "a.txt"))
    assert not storage.exists(storage.join(remote, "missing.txt"))
    assert not storage.exists(remote)  # a prefix is not a file
    assert storage.read_text(storage.join(remote, "a.txt")) == "alpha"
    storage.write_text(storage.join(remote, "c.txt"), "gamma")
    with storage.local_folder(remote) as copy:
        assert (copy / "sub" / "b.bin").read_bytes() == b"\0\1\2"
        assert (copy / "c.txt").read_text() == "gamma"
    with storage.local_file(storage.join(remote, "a.txt")) as copy:
        assert copy.read_text() == "alpha"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(remote, "missing.txt"))
    with pytest.raises(FileNotFoundError):
        storage.download_folder(storage.join(s3_bucket, "nothing"), tmp_path / "nothing")


def test_missing_bucket_and_unreachable_endpoint_are_one_line_errors(s3_server, monkeypatch):
    with pytest.raises(StorageError, match=r"^save_folder s3://no-such-bucket/run: bucket 'no-such-bucket' "):
        storage.check("s3://no-such-bucket/run", "save_folder")
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError) as caught:
        storage.check("s3://bucket/run", "save_folder")
    message = str(caught.value)
    assert message.startswith("save_folder s3://bucket/run: cannot check at http://127.0.0.1:")
    assert "\n" not in message


def test_an_endpoint_that_never_answers_is_a_one_line_error_after_the_set_wait(monkeypatch):
    """An endpoint that accepts the connection and never answers (a hung proxy, a stopped server behind a
    load balancer): refused after S3_TRIES waits of S3_READ_TIMEOUT, naming the wait; botocore's default
    would wait 60 s per try, ours 30 s by default."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts the connections; nobody reads or answers
        monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("S3_READ_TIMEOUT", "0.5")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        started = time.monotonic()
        with pytest.raises(StorageError) as caught:
            storage.read_text("s3://bucket/run/x.txt")
        waited = time.monotonic() - started
    message = str(caught.value)
    assert message.startswith("s3://bucket/run/x.txt: cannot read at http://127.0.0.1:"), message
    assert f"no answer within 0.5 s, {storage.S3_TRIES} tries; S3_READ_TIMEOUT sets the wait" in message
    assert "\n" not in message
    assert 0.5 * storage.S3_TRIES <= waited < 30, waited
    for bad in ("0", "-1", "ten", "inf", "nan"):
        monkeypatch.setenv("S3_READ_TIMEOUT", bad)
        refused = rf"^S3_READ_TIMEOUT={bad}: must be a number of seconds above 0$"
        with pytest.raises(StorageError, match=refused):
            storage.exists("s3://bucket/x")
    monkeypatch.delenv("S3_READ_TIMEOUT")
    assert storage.s3_read_timeout() == storage.S3_READ_TIMEOUT_DEFAULT == 30


def test_a_failed_upload_and_another_schemes_client_are_one_line_errors(s3_server, tmp_path):
    """boto3's transfer manager wraps an upload's ClientError in its own exception; gs:// goes through
    streaming's client, which refuses without credentials."""
    local = tmp_path / "x.txt"
    local.write_text("x")
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/x.txt: bucket 'no-such-bucket' does not"):
        storage.upload_file(local, "s3://no-such-bucket/x.txt")
    with pytest.raises(StorageError, match=r"^gs://some-bucket/x.txt: cannot read: ") as caught:
        storage.download_file("gs://some-bucket/x.txt", tmp_path / "fetched.txt")
    assert "\n" not in str(caught.value) and not (tmp_path / "fetched.txt").exists()
    assert storage.is_uri("s3:/bucket/key") and not storage.is_uri("c:/data") and not storage.is_uri("a/b:/c")


def test_another_schemes_refused_client_is_one_line_and_leaves_nothing_in_tmp(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    local = tmp_path / "x.txt"
    local.write_text("x")
    with pytest.raises(StorageError, match=r"^gs://some-bucket/run: cannot list it: "):
        storage.list_files("gs://some-bucket/run")
    with pytest.raises(StorageError, match=r"^gs://some-bucket/x.txt: cannot write: ") as caught:
        storage.upload_file(local, "gs://some-bucket/x.txt")
    assert "\n" not in str(caught.value)
    assert list(scratch.iterdir()) == []


def test_a_scratch_folder_is_deleted_at_exit(tmp_path):
    """What a run fetches for its whole life (a tokenizer from a bucket) goes there, not into /tmp for
    good."""
    code = (
        "from modernbert_train import storage; "
        "folder = storage.scratch_folder('modernbert-x-'); (folder / 'f').write_text('x'); print(folder)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip())
    assert folder.parent == tmp_path and folder.name.startswith("modernbert-x-") and not folder.exists()


def test_a_malformed_endpoint_is_named(monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", "localhost:9000 ")
    with pytest.raises(StorageError, match=r"^S3_ENDPOINT_URL=localhost:9000 : not an endpoint URL"):
        storage.read_bytes("s3://bucket/x")


def test_local_paths_pass_through(tmp_path):
    storage.check(tmp_path / "new", "--output")  # local paths are not checked here
    storage.write_text(tmp_path / "deep" / "x.txt", "x")
    assert storage.list_files(tmp_path) == ["deep/x.txt"]
    assert storage.exists(tmp_path / "deep" / "x.txt") and not storage.exists(tmp_path / "deep")
    assert storage.list_files(tmp_path / "absent") == []


def test_hf_folder_round_trip_through_s3(s3_bucket):
    import torch

    from modernbert_train.hf import from_hf, read_hf_config, to_hf
    from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

    ids = dict(pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    model = ModernBertForMaskedLM(ModernBertConfig.from_preset("tiny", vocab_size=64, **ids)).eval()
    folder = storage.join(s3_bucket, "export", "hf")
    assert to_hf(model, folder) == folder
    assert {"config.json", "model.safetensors"} <= set(storage.list_files(folder))
    assert read_hf_config(folder).to_dict() == model.config.to_dict()
    loaded = from_hf(folder).eval()
    tokens = torch.tensor([[1, 5, 6, 7, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
