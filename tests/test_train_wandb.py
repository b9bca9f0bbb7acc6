"""W&B through Composer's WandBLogger, offline: the run's records hold the resolved recipe and the metrics; a
resumed run (autoresume after a crash or preemption) continues the W&B run its checkpoint logged to, whose id
the checkpoint keeps; a fresh run or a phase change gets a new one."""

import importlib.util
import json
import shutil
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import REPO, run_train
from test_train_start import write_recipe as finished_recipe

from modernbert_train.train.checkpoint import checkpoint_summary
from modernbert_train.train.run_metadata import RunMetadata

# The newest stack's venv (.venv-compat), like the offline GPU image, has no wandb: runs logging to W&B there
# stop at the start with Composer's one-line MissingConditionalImportError.
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")


def read_records(path):
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(path))
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        yield record


def logged_config(records) -> dict:
    """The run's config as W&B would show it: the run record's, then each config update in order."""
    updates = [r.run.config for r in records if r.WhichOneof("record_type") == "run"]
    updates += [r.config for r in records if r.WhichOneof("record_type") == "config"]
    return {item.key: json.loads(item.value_json) for update in updates for item in update.update}


def offline_run(wandb_dir):
    """The one offline W&B run under `wandb_dir`: its run record, and the steps of its train losses (Composer
    logs batch k's loss at step k - 1, before its clock counts the batch)."""
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    records = list(read_records(next(run_dir.glob("run-*.wandb"))))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    steps = [h.step.num for h in history if any("/".join(i.nested_key) == "loss/train/total" for i in h.item)]
    return run, steps


@pytest.mark.slow
@needs_wandb
def test_wandb_offline_run_has_config_and_metrics(write_recipe, tmp_path):
    recipe = write_recipe(
        max_duration="3ba",
        data={"eval": []},
        loggers={"wandb": {"project": "mbt-test", "tags": ["tiny", "ci"], "mode": "offline"}},
    )
    run_train(recipe, WANDB_DIR=str(tmp_path))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = list(read_records(next(run_dir.glob("run-*.wandb"))))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "mbt-test" and list(run.tags) == ["tiny", "ci"] and run.display_name == "test"
    config = logged_config(records)
    assert config["max_duration"] == "3ba"
    assert config["model"]["preset"] == "tiny"
    assert config["optimizer"]["lr"] == 3e-3
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    logged = {"/".join(item.nested_key) or item.key for h in history for item in h.item}
    assert "loss/train/total" in logged


@pytest.mark.parametrize("sharded", [False, True])
def test_checkpoint_keeps_the_wandb_run_id(tmp_path, monkeypatch, sharded):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    for run_id in ("abc123", None):  # a run that logs to W&B, and one that does not
        wandb_run = SimpleNamespace(id=run_id, disabled=False) if run_id else None
        monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=wandb_run))
        metadata = RunMetadata({}, str(tokenizer), {})
        metadata.fit_start(None, None)
        clock = {"epoch": 0, "batch": 3, "sample": 24, "token": 1536}
        state = {
            "timestamp": {"Timestamp": clock},
            "model": {"model.w": torch.zeros(2)},
            "callbacks": {"RunMetadata": metadata.state_dict()},
        }
        path = tmp_path / str(run_id) / ("ep0-ba3" if sharded else "ep0-ba3-rank0.pt")
        path.parent.mkdir()
        if sharded:
            with warnings.catch_warnings():  # one process saves on purpose; torch warns that it does
                warnings.simplefilter("ignore")
                dcp.save({"state": state}, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
        else:
            torch.save({"state": state}, path)
        assert checkpoint_summary(path).wandb_run_id == run_id


@pytest.fixture(scope="module")
def first_attempt(tmp_path_factory, tiny_data):
    """A 3-batch autoresume run logging to W&B offline: its recipe, save folder and W&B run id."""
    folder = tmp_path_factory.mktemp("wandb")
    recipe = finished_recipe(
        folder / "recipe.yaml", tiny_data, folder / "run", run_name="attempts", max_duration="3ba",
        save_interval="3ba", loggers={"wandb": {"project": "mbt-test", "mode": "offline"}},
    )  # fmt: skip
    run_train(recipe, WANDB_DIR=str(folder))
    run, steps = offline_run(folder)
    assert steps == [0, 1, 2]
    assert checkpoint_summary(folder / "run" / "ep0-ba3-rank0.pt").wandb_run_id == run.run_id
    return recipe, folder / "run", run.run_id


@pytest.mark.slow
@pytest.mark.xdist_group("wandb")
@needs_wandb
def test_resumed_run_continues_the_wandb_run(first_attempt, tmp_path):
    recipe, folder, run_id = first_attempt
    shutil.copytree(folder, tmp_path / "run", symlinks=True)
    done = run_train(recipe, f"save_folder={tmp_path / 'run'}", "max_duration=5ba", WANDB_DIR=str(tmp_path))
    assert f"modernbert-train: continuing W&B run {run_id} of checkpoint" in done.stderr
    assert "`resume` will be ignored since W&B syncing is set to `offline`" in done.stderr  # W&B's own word
    run, steps = offline_run(tmp_path)
    assert run.run_id == run_id and run.display_name == "attempts"
    assert steps == [3, 4]  # the clock went on
    assert checkpoint_summary(tmp_path / "run" / "ep0-ba5-rank0.pt").wandb_run_id == run_id  # and on


@pytest.mark.slow
@pytest.mark.xdist_group("wandb")
@needs_wandb
def test_fresh_run_with_the_same_name_gets_a_new_wandb_run(first_attempt, tmp_path):
    recipe, _, run_id = first_attempt
    done = run_train(recipe, f"save_folder={tmp_path / 'run'}", "max_duration=2ba", WANDB_DIR=str(tmp_path))
    run, _ = offline_run(tmp_path)
    assert run.display_name == "attempts" and run.run_id != run_id
    assert "continuing W&B run" not in done.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("wandb")
@needs_wandb
def test_phase_change_gets_a_new_wandb_run(first_attempt, tmp_path):
    recipe, folder, run_id = first_attempt
    done = run_train(
        recipe,
        f"save_folder={tmp_path / 'run'}",
        f"load_path={folder / 'ep0-ba3-rank0.pt'}",
        "reset_time=true",
        "max_duration=2ba",
        WANDB_DIR=str(tmp_path),
    )
    run, steps = offline_run(tmp_path)
    assert run.run_id != run_id and steps == [0, 1]
    assert "continuing W&B run" not in done.stderr


@needs_wandb
def test_a_continued_run_may_change_its_config(tmp_path, monkeypatch):
    """A continued W&B run holds its earlier starts' config; a resume that changes a value (max_duration, the
    ranks per node) made wandb.config.update raise ConfigError while the Trainer was built."""
    import wandb

    from modernbert_train.train.run import RecipeWandBLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    destination = RecipeWandBLogger(
        {"max_duration": "3ba", "model": {"preset": "tiny"}}, project="mbt-test", name="attempts",
        init_kwargs={"mode": "offline", "dir": str(tmp_path)},
    )  # fmt: skip
    destination.init(SimpleNamespace(run_name="attempts"), None)
    try:
        destination.log_hyperparameters({"max_duration": "5ba", "num_nodes": 2})
        assert wandb.config["max_duration"] == "5ba" and wandb.config["model"] == {"preset": "tiny"}
        assert wandb.config["num_nodes"] == 2
    finally:
        destination.post_close()


@needs_wandb
def test_wandb_run_id_opens_that_run_for_every_start(monkeypatch):
    """WANDB_RUN_ID alone was left to W&B, without resume="allow": a second start with it did not continue."""
    from modernbert_train.train.config import load_config
    from modernbert_train.train.run import loggers

    monkeypatch.setenv("WANDB_RUN_ID", "shared-run")
    config = load_config(REPO / "yamls" / "default.yaml", ["loggers.wandb.mode=offline", "save_folder=null"])
    [destination] = [d for d in loggers(config) if not hasattr(d, "every")]
    assert destination._init_kwargs["id"] == "shared-run" and destination._init_kwargs["resume"] == "allow"
