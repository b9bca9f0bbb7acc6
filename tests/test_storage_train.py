"""A run that lives in a bucket, end to end against the suite's S3 server: shard to s3://, inspect it, train
from it with save_folder=s3:// and autoresume, SIGKILL after a checkpoint, rerun the same command, export."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_env, run_train, train_command
from transformers import AutoModelForMaskedLM

from modernbert_train import storage
from modernbert_train.train.checkpoint_files import sha256

pytestmark = pytest.mark.slow
CHECKPOINT = re.compile(r"ep\d+-ba(\d+)-rank0\.pt")


def data_cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "data_prep.cli", *args],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_shard_train_kill_resume_and_export_in_a_bucket(s3_bucket, tiny_data, write_recipe, tmp_path):
    data = storage.join(s3_bucket, "data", "train")
    data_cli("shard", "--input", str(tiny_data / "corpus" / "train.jsonl"), "--output", data,
             "--tokenizer", str(tiny_data / "tokenizer"), "--workers", "1")  # fmt: skip
    inspected = json.loads(data_cli("inspect", data, "--json").stdout)
    assert inspected["documents"] == 400 and inspected["path"] == data

    run = storage.join(s3_bucket, "run")
    recipe = write_recipe(
        max_duration="16ba",
        autoresume=True,
        save_interval="4ba",
        save_folder=run,
        data={"train": [{"remote": data, "local": str(tmp_path / "cache")}], "eval": []},
        export={"hf_dir": storage.join(run, "hf")},
    )
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            train_command(recipe), cwd=REPO, env=run_env(), stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + 300
    while not any(CHECKPOINT.fullmatch(name) for name in storage.list_files(run)):
        assert process.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint reached the bucket"
        time.sleep(0.1)
    # The whole process group, as when a node dies: Composer's uploader runs in processes of its own.
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(int(m[1]) for name in storage.list_files(run) if (m := CHECKPOINT.fullmatch(name)))
    assert killed_at < 16, "the run finished before the kill (uploads slower than training)"
    # The metrics were uploaded with (before) the checkpoint.
    assert killed_at in {row["batch"] for row in read_json_lines(storage.join(run, "metrics.jsonl"))}

    resumed = run_train(recipe, timeout=600)  # the same command again
    loaded = re.findall(r"Loading checkpoint from (\S+)", resumed.stderr)
    assert loaded == [storage.join(run, f"ep0-ba{killed_at}-rank0.pt")], resumed.stderr[-3000:]
    rows = read_json_lines(storage.join(run, "metrics.jsonl"))
    # Continued from the checkpoint: the killed run's rows up to it, then the rest, one row per batch.
    assert [row["batch"] for row in rows] == list(range(1, 17))
    assert all(
        0 <= row["time/data_wait_fraction"] <= 1 and 0 < row["data/packing_efficiency"] <= 1 for row in rows
    )
    names = storage.list_files(run)
    assert {"config.yaml", "ep0-ba16-rank0.pt", "hf/config.json", "hf/model.safetensors"} <= set(names)
    assert not (REPO / "s3:").exists()

    exported = tmp_path / "exported"
    done = subprocess.run(
        [sys.executable, "-m", "modernbert_train.train.export", storage.join(run, "ep0-ba16-rank0.pt"),
         str(exported)], cwd=REPO, env=run_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with storage.local_folder(storage.join(run, "hf")) as hf_dir:
        at_end = AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    from_checkpoint = AutoModelForMaskedLM.from_pretrained(exported).eval()
    ids = torch.tensor([[1, 10, 20, 30, 2]])
    with torch.no_grad():
        assert torch.equal(at_end(ids).logits, from_checkpoint(ids).logits)


def read_json_lines(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines()]


def test_a_damaged_checkpoint_in_a_bucket_is_skipped_and_moved_aside(s3_bucket, write_recipe, tmp_path):
    """Each checkpoint goes up with its checksum; on resume a bit-flipped newest one is named, moved aside to
    NAME.bad (the resumed run saves under its name again) and the one before it is loaded."""
    run = storage.join(s3_bucket, "damaged")
    recipe = write_recipe(
        max_duration="8ba", autoresume=True, save_interval="4ba", save_folder=run, data={"eval": []}
    )
    run_train(recipe, timeout=600)
    names = set(storage.list_files(run))
    for batch in (4, 8):
        name = f"ep0-ba{batch}-rank0.pt"
        with storage.local_file(storage.join(run, name)) as local:
            digest = sha256(local)
        assert storage.read_text(storage.join(run, f"{name}.sha256")) == f"{digest}  {name}\n"
    assert {"ep0-ba4-rank0.pt.sha256", "ep0-ba8-rank0.pt.sha256"} <= names
    newest = storage.join(run, "ep0-ba8-rank0.pt")
    data = bytearray(storage.read_bytes(newest))
    data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)
    storage.write_bytes(newest, bytes(data))
    # The checksum of a checkpoint whose own upload failed: the resumed run saves ba12 and its checksum again.
    orphan = storage.join(run, "ep0-ba12-rank0.pt.sha256")
    storage.write_text(orphan, f"{'0' * 64}  ep0-ba12-rank0.pt\n")

    longer = write_recipe(
        tmp_path / "longer.yaml", max_duration="12ba", autoresume=True, save_interval="4ba", save_folder=run,
        data={"eval": []},
    )  # fmt: skip
    resumed = run_train(longer, timeout=600)
    assert (
        f"skipped {newest}: its bytes do not match the checksum in ep0-ba8-rank0.pt.sha256" in resumed.stderr
    )
    assert re.findall(r"Loading checkpoint from (\S+)", resumed.stderr) == [
        storage.join(run, "ep0-ba4-rank0.pt")
    ]
    names = set(storage.list_files(run))
    assert {
        "ep0-ba8-rank0.pt.bad",
        "ep0-ba8-rank0.pt.bad.sha256",
        "ep0-ba8-rank0.pt",
        "ep0-ba12-rank0.pt",
    } <= names
    assert storage.read_bytes(storage.join(run, "ep0-ba8-rank0.pt.bad")) == bytes(data)
    # Nothing outside save_folder (Composer's credential check wrote to the bucket's root).
    assert all(name.startswith("damaged/") for name in storage.list_files(s3_bucket))
    assert f"moved {orphan} aside to ep0-ba12-rank0.pt.bad.sha256" in resumed.stderr
    with storage.local_file(storage.join(run, "ep0-ba12-rank0.pt")) as local:
        assert storage.read_text(orphan).split()[0] == sha256(local)


def test_a_bucket_keeps_the_newest_checkpoints_across_a_resume(s3_bucket, write_recipe, tmp_path, request):
    """save_num_checkpoints_to_keep=2 with a checkpoint every batch: once each upload is done, the bucket
    holds the newest 2 with their checksums; the resumed run counts (and deletes) the first attempt's too,
    and the run's other objects (a damaged checkpoint moved aside among them) stay. The metrics' local copy
    is deleted once uploaded."""
    run = storage.join(s3_bucket, "kept")
    # Short: Composer's uploader starts a multiprocessing Manager whose socket lies in TMPDIR, and a socket
    # path has at most 107 bytes (pytest's popen-gwN/test_.../tmp under /tmp/pytest-of-USER/pytest-NNN is
    # past that once NNN has three digits).
    scratch = Path(tempfile.mkdtemp(prefix="mb-"))
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))

    def train(duration: str) -> None:
        recipe = write_recipe(
            tmp_path / f"{duration}.yaml", max_duration=duration, autoresume=True, save_interval="1ba",
            save_num_checkpoints_to_keep=2, save_folder=run, data={"eval": []},
        )  # fmt: skip
        run_train(recipe, timeout=600, TMPDIR=str(scratch))
        assert not list(scratch.glob("modernbert-metrics-*"))

    def checkpoints() -> set[str]:
        return {
            name for name in storage.list_files(run) if CHECKPOINT.fullmatch(name.removesuffix(".sha256"))
        }

    train("5ba")
    kept = {"ep0-ba4-rank0.pt", "ep0-ba5-rank0.pt"}
    assert checkpoints() == kept | {f"{name}.sha256" for name in kept}
    for name in ("ep0-ba1-rank0.pt.bad", "ep0-ba1-rank0.pt.bad.sha256"):
        storage.write_text(storage.join(run, name), "moved aside by an earlier resume")
    others = set(storage.list_files(run)) - checkpoints()
    assert {"config.yaml", "metrics.jsonl", "ep0-ba1-rank0.pt.bad"} <= others

    train("8ba")
    kept = {"ep0-ba7-rank0.pt", "ep0-ba8-rank0.pt"}
    assert checkpoints() == kept | {f"{name}.sha256" for name in kept}
    assert set(storage.list_files(run)) - checkpoints() == others
    assert [row["batch"] for row in read_json_lines(storage.join(run, "metrics.jsonl"))] == list(range(1, 9))
