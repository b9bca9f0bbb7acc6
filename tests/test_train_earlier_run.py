"""A run that does not resume, into a save_folder where an earlier run left checkpoints or metrics
(train/start.py): refused in one line with nothing touched, or, under save_overwrite, started once exactly
the earlier run's entries are deleted (local folders and s3 buckets). End to end: test_train_start.py."""

from pathlib import Path

import pytest

from modernbert_train import storage
from modernbert_train.train.checkpoint import CheckpointError
from modernbert_train.train.checkpoint_files import is_run_entry
from modernbert_train.train.config import load_config
from modernbert_train.train.start import StartKind, decide_start, replace_earlier_run

RUN_ENTRIES = [
    "ep0-ba4-rank0.pt",
    "ep0-ba4-rank0.pt.sha256",
    "ep0-ba8-rank0.pt.bad",
    "ep0-ba8-rank0.pt.bad.sha256",
    ".ep0-ba12-rank0.pt.partial",
    "latest-rank0.pt",
    "metrics.jsonl",
]
KEPT = ["config.yaml", "traceback-rank0.log", ".lock", "hf/config.json", "notes.txt", "ep0-ba4-rank0.ptx"]


def test_which_entries_an_earlier_run_left():
    for name in [*RUN_ENTRIES, "ep1-ba16", "ep1-ba16.sha256", "ep1-ba16.bad", ".latest-rank0.pt.partial"]:
        assert is_run_entry(name), name
    for name in [*KEPT, "hf", "ep0-ba-rank0.pt", "metrics.jsonl.tmp", "rank0.pt"]:
        assert not is_run_entry(name), name


def plant(folder: Path) -> None:
    for name in [*RUN_ENTRIES, *KEPT]:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    (folder / "ep1-ba16").mkdir()  # a sharded checkpoint's folder
    (folder / "ep1-ba16" / "__0_0.distcp").write_text("shard")
    (folder / "latest-rank0.pt").unlink()
    (folder / "latest-rank0.pt").symlink_to("ep9-ba99-rank0.pt")  # dangling: still the earlier run's


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


@pytest.mark.parametrize("load", [False, True])
def test_a_fresh_or_loading_run_into_an_earlier_runs_folder_is_refused_and_nothing_changes(
    write_recipe, tmp_path, load
):
    folder = tmp_path / "run"
    plant(folder)
    before = listing(folder)
    overrides = [f"load_path={tmp_path / 'elsewhere.pt'}", "load_weights_only=true"] if load else []
    config = load_config(write_recipe(), overrides)
    with pytest.raises(CheckpointError) as refused:
        decide_start(config)
    assert str(refused.value) == (
        f"save_folder {folder} holds an earlier run (.ep0-ba12-rank0.pt.partial, ep0-ba4-rank0.pt, "
        "ep0-ba4-rank0.pt.sha256 and 5 more); autoresume=true continues it, save_overwrite=true deletes it "
        "first, or choose another save_folder"
    )
    assert listing(folder) == before


def test_save_overwrite_deletes_the_earlier_runs_entries_and_nothing_else(write_recipe, tmp_path, capsys):
    folder = tmp_path / "run"
    plant(folder)
    config = load_config(write_recipe(), ["save_overwrite=true"])
    start = decide_start(config)
    assert start.kind is StartKind.FRESH
    assert len(listing(folder)) == len(RUN_ENTRIES) + len(KEPT) + 1  # deleted once the Trainer is built
    replace_earlier_run(config, start)
    assert listing(folder) == sorted(KEPT)
    assert capsys.readouterr().err.strip() == (
        "modernbert-train: save_overwrite: deleted the earlier run's 8 checkpoint and metrics entries in "
        f"{folder}"
    )


def test_an_empty_or_missing_folder_and_autoresume_need_no_overwrite(write_recipe, tmp_path):
    assert decide_start(load_config(write_recipe())).kind is StartKind.FRESH  # no folder yet
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    assert decide_start(load_config(write_recipe())).kind is StartKind.FRESH
    # autoresume with no whole checkpoint: a fresh start of this same run (its rows are dropped by the logger)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"batch": 1}\n')
    assert decide_start(load_config(write_recipe(), ["autoresume=true"])).kind is StartKind.FRESH
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_buckets_earlier_run_is_refused_then_deleted_under_save_overwrite(write_recipe, s3_bucket, capsys):
    folder = storage.join(s3_bucket, "runs", "a")
    for name in ["ep0-ba4-rank0.pt", "ep0-ba4-rank0.pt.sha256", "metrics.jsonl", "config.yaml"]:
        storage.write_text(storage.join(folder, name), name)
    storage.write_text(storage.join(folder, "ep1-ba16", "__0_0.distcp"), "shard")
    storage.write_text(storage.join(s3_bucket, "runs", "a-other", "metrics.jsonl"), "another run's")
    recipe = write_recipe(save_folder=folder)
    with pytest.raises(CheckpointError, match=r"an earlier run \(ep0-ba4-rank0.pt, ep0-ba4-rank0.pt.sha256"):
        decide_start(load_config(recipe))
    assert len(storage.list_files(folder)) == 5
    config = load_config(recipe, ["save_overwrite=true"])
    start = decide_start(config)
    assert start.kind is StartKind.FRESH and len(storage.list_files(folder)) == 5
    replace_earlier_run(config, start)
    assert storage.list_files(folder) == ["config.yaml"]
    assert storage.list_files(storage.join(s3_bucket, "runs", "a-other")) == ["metrics.jsonl"]
    assert "deleted the earlier run's 4 checkpoint and metrics entries" in capsys.readouterr().err


def test_a_recipe_refused_after_the_start_was_decided_deletes_nothing(write_recipe, tmp_path, capsys):
    """save_overwrite deleted the earlier run before the rest of the recipe was built: a typo the builders
    refuse (an unknown scheduler) cost the earlier run and trained nothing."""
    from modernbert_train.train.main import main

    folder = tmp_path / "run"
    plant(folder)
    before = listing(folder)
    with pytest.raises(SystemExit) as exited:
        main([str(write_recipe()), "save_overwrite=true", "scheduler.name=wds"])
    assert exited.value.code == 2 and "wds" in capsys.readouterr().err
    assert listing(folder) == before
