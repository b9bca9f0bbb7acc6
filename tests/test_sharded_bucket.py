"""Autoresume from FSDP sharded checkpoints in a bucket: which folders are whole (from the listing and the
folder's `.metadata`), what is fetched to read one's clock, incomplete ones moved aside, and (slow) a
2-rank FSDP2 run into s3:// that resumes exactly from the newest whole folder."""

import dataclasses
import json
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import REPO, free_port, run_env

from modernbert_train import storage
from modernbert_train.train import start
from modernbert_train.train.checkpoint import (
    CheckpointError,
    sharded_files,
    sharded_metadata,
    sharded_summary_files,
    why_incomplete_sharded,
)


def _dcp_save(state: dict, folder: Path) -> None:
    with warnings.catch_warnings():  # one process saves on purpose; torch warns that it does
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)


def two_rank_checkpoint(folder: Path, batch: int) -> Path:
    """A sharded checkpoint laid out as two ranks leave one: `__0_0.distcp` holds the clock and the run
    metadata, `__1_0.distcp` weights, `.metadata` refers to both."""
    clock = {"epoch": 0, "batch": batch, "sample": 8 * batch, "token": 500 * batch}
    metadata = {"recipe": {"optimizer": {"lr": 3e-3}}, "tokenizer_json": "{}"}
    parts = folder.parent / f".{folder.name}-parts"
    _dcp_save(
        {
            "state": {
                "timestamp": {"Timestamp": clock},
                "callbacks": {"RunMetadata": {"json": json.dumps(metadata)}},
            }
        },
        parts / "0",
    )
    _dcp_save({"state": {"model": {"weight": torch.arange(4096, dtype=torch.float32)}}}, parts / "1")
    merged, other = (sharded_metadata(parts / rank) for rank in ("0", "1"))
    merged.state_dict_metadata.update(other.state_dict_metadata)
    merged.planner_data.update(other.planner_data)
    merged.storage_data.update(
        (index, dataclasses.replace(stored, relative_path="__1_0.distcp"))
        for index, stored in other.storage_data.items()
    )
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(pickle.dumps(merged))
    shutil.copyfile(parts / "0" / "__0_0.distcp", folder / "__0_0.distcp")
    shutil.copyfile(parts / "1" / "__0_0.distcp", folder / "__1_0.distcp")
    shutil.rmtree(parts)
    return folder


def test_what_the_metadata_refers_to_and_where_the_clock_is(tmp_path):
    folder = two_rank_checkpoint(tmp_path / "ep0-ba4", 4)
    metadata = sharded_metadata(folder)
    sizes = {name: (folder / name).stat().st_size for name in ("__0_0.distcp", "__1_0.distcp")}
    assert sharded_files(metadata) == sizes  # each file ends with the last value it stores
    assert sharded_summary_files(metadata) == ["__0_0.distcp"]
    assert storage.list_sizes(folder) == {**sizes, ".metadata": (folder / ".metadata").stat().st_size}


MISSING_SHARD = "is incomplete (__1_0.distcp is missing; its .metadata refers to it)"


@pytest.mark.parametrize(
    "missing, short, reason",
    [
        (None, False, None),
        (".metadata", False, "is incomplete (no .metadata)"),
        ("__1_0.distcp", False, MISSING_SHARD),
        (None, True, "is incomplete (__1_0.distcp holds {} bytes; its .metadata refers to {})"),
    ],
    ids=["whole", "no .metadata", "a shard missing", "a shard short"],
)
def test_a_sharded_folder_is_whole_with_its_metadata_and_every_byte_it_refers_to(
    tmp_path, missing, short, reason
):
    folder = two_rank_checkpoint(tmp_path / "ep0-ba4", 4)
    files = storage.list_sizes(folder)
    files.pop(missing, None)
    needed = files["__1_0.distcp"] if short else None
    if short:
        files["__1_0.distcp"] -= 1
    metadata = sharded_metadata(folder) if ".metadata" in files else None
    assert why_incomplete_sharded(files, metadata) == (reason.format(needed - 1, needed) if short else reason)
    # Where the listing gives no sizes (the streaming schemes) only missing files count.
    assert why_incomplete_sharded(dict.fromkeys(files), metadata) == (None if short else reason)


def upload_checkpoint(local: Path, run: str) -> None:
    if local.is_dir():
        storage.upload_folder(local, storage.join(run, local.name))
    else:
        storage.upload_file(local, storage.join(run, local.name))


def test_the_newest_whole_checkpoint_in_a_bucket_among_files_and_sharded_folders(
    s3_bucket, tmp_path, monkeypatch, capsys
):
    """Files and folders interleave by batch; an incomplete folder (no .metadata: a save cut short before
    rank 0's upload; a shard missing) is skipped and moved aside whole; reading a folder's clock fetches only
    its .metadata and the file holding the clock."""
    run = storage.join(s3_bucket, "run")
    local = tmp_path / "local"
    upload_checkpoint(two_rank_checkpoint(local / "ep0-ba2", 2), run)
    clock = {"epoch": 0, "batch": 3, "sample": 24, "token": 1500}
    torch.save({"state": {"timestamp": {"Timestamp": clock}, "model": {}}}, local / "ep0-ba3-rank0.pt")
    upload_checkpoint(local / "ep0-ba3-rank0.pt", run)
    upload_checkpoint(two_rank_checkpoint(local / "ep0-ba4", 4), run)
    storage.remove(storage.join(run, "ep0-ba4", "__1_0.distcp"))
    storage.upload_file(
        two_rank_checkpoint(local / "ep0-ba6", 6) / "__1_0.distcp", f"{run}/ep0-ba6/__1_0.distcp"
    )
    fetched = []
    download = storage.download_file
    monkeypatch.setattr(storage, "download_file", lambda uri, to: fetched.append(uri) or download(uri, to))

    checkpoint, summary = start._latest_remote_checkpoint(run)
    assert (checkpoint, summary.clock["batch"]) == (f"{run}/ep0-ba3-rank0.pt", 3)
    err = capsys.readouterr().err
    assert f"skipped {run}/ep0-ba6: is incomplete (no .metadata); moved aside to ep0-ba6.bad" in err
    assert f"skipped {run}/ep0-ba4: {MISSING_SHARD}; moved aside to ep0-ba4.bad" in err
    names = set(storage.list_files(run))
    assert {"ep0-ba4.bad/.metadata", "ep0-ba4.bad/__0_0.distcp", "ep0-ba6.bad/__1_0.distcp"} <= names
    assert not any(name.startswith(("ep0-ba4/", "ep0-ba6/")) for name in names)
    assert fetched == [f"{run}/ep0-ba4/.metadata", f"{run}/ep0-ba3-rank0.pt"]

    storage.remove(storage.join(run, "ep0-ba3-rank0.pt"))
    fetched.clear()
    checkpoint, summary = start._latest_remote_checkpoint(run)
    assert (checkpoint, summary.clock["batch"]) == (f"{run}/ep0-ba2", 2)
    assert summary.recipe == {"optimizer": {"lr": 3e-3}}
    assert fetched == [f"{run}/ep0-ba2/.metadata", f"{run}/ep0-ba2/__0_0.distcp"]  # not rank 1's shard
    # A load_path naming a sharded folder in a bucket reads the same way.
    assert start._summary(f"{run}/ep0-ba2").clock["batch"] == 2
    with pytest.raises(CheckpointError, match=r"ep0-ba4.bad is incomplete \(__1_0.distcp is missing"):
        start._summary(f"{run}/ep0-ba4.bad")


LAUNCHER = [sys.executable, "-m", "composer.cli.launcher"]


def launch(recipe: Path, log: Path, *overrides: str) -> str:
    """`composer -n 2 -m modernbert_train.train RECIPE [OVERRIDES]`; its console output (every rank's)."""
    command = [*LAUNCHER, "-n", "2", "--master_port", str(free_port()), "-m", "modernbert_train.train"]
    with log.open("w+b") as out:
        command += [str(recipe), *overrides]
        process = subprocess.run(
            command, cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT, timeout=600
        )
        out.seek(0)
        output = out.read().decode(errors="replace")
    assert process.returncode == 0, output[-4000:]
    return output


def losses(run: str) -> dict[int, float]:
    rows = [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    assert [row["batch"] for row in rows] == list(range(1, len(rows) + 1))
    return {row["batch"]: row["loss/train/total"] for row in rows}


@pytest.mark.slow
def test_fsdp2_sharded_checkpoints_in_a_bucket_autoresume_exactly(s3_bucket, write_recipe, tmp_path):
    """Two ranks, FSDP2, sharded checkpoints into s3:// every 2 batches, to batch 4. One shard of the newest
    folder is deleted (a rank's upload lost); the same command with a longer max_duration skips that folder
    (moved aside, so the resumed run can save under its name again), resumes from batch 2, and trains
    batches 3 and 4 as the uninterrupted run did."""
    run = storage.join(s3_bucket, "run")
    recipe = write_recipe(
        max_duration="4ba", save_interval="2ba", autoresume=True, save_folder=run, data={"eval": []},
        parallelism={"fsdp": {"state_dict_type": "sharded"}},
    )  # fmt: skip
    launch(recipe, tmp_path / "first.log")
    straight = losses(run)
    assert sorted(straight) == [1, 2, 3, 4]
    shards = {"ep0-ba4/.metadata", "ep0-ba4/__0_0.distcp", "ep0-ba4/__1_0.distcp"}
    assert shards <= set(storage.list_files(run))
    storage.remove(storage.join(run, "ep0-ba4", "__1_0.distcp"))

    output = launch(recipe, tmp_path / "resumed.log", "max_duration=6ba")
    assert f"skipped {run}/ep0-ba4: {MISSING_SHARD}; moved aside to ep0-ba4.bad" in output
    assert set(re.findall(r"Loading checkpoint from (\S+)", output)) == {f"{run}/ep0-ba2"}
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 7))
    for batch in (1, 2, 3, 4):
        assert resumed[batch] == pytest.approx(straight[batch], rel=1e-5), f"batch {batch}"
    names = set(storage.list_files(run))
    assert shards | {"ep0-ba4.bad/.metadata", "ep0-ba4.bad/__0_0.distcp", "ep0-ba6/.metadata"} <= names
    checkpoint, summary = start._latest_remote_checkpoint(run)
    assert (checkpoint, summary.clock["batch"]) == (f"{run}/ep0-ba6", 6)
