"""W&B through Composer's WandBLogger, offline: the run's records hold the resolved recipe and the metrics."""

import json

import pytest
from conftest import run_train

pytestmark = pytest.mark.slow


def read_records(path):
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(path))
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        yield record


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
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["max_duration"] == "3ba"
    assert config["model"]["preset"] == "tiny"
    assert config["optimizer"]["lr"] == 3e-3
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    logged = {"/".join(item.nested_key) or item.key for h in history for item in h.item}
    assert "loss/train/total" in logged
