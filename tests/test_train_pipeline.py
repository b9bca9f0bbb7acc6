"""modernbert-pipeline: three phases from one command, each from the previous one's final checkpoint; a rerun
skips finished phases and resumes the interrupted one exactly."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, losses_by_batch, read_metrics, run_env

from modernbert_train.train.config import ConfigError
from modernbert_train.train.pipeline import load_pipeline


def pipeline_command(path) -> list[str]:
    return [sys.executable, "-m", "modernbert_train.train.pipeline", str(path)]


def write_pipeline(tmp_path, write_recipe) -> tuple:
    write_recipe(max_duration="4ba", save_interval="2ba", data={"eval": []})
    phases = [
        {"recipe": "recipe.yaml", "overrides": [f"save_folder={tmp_path / 'pretrain'}", "run_name=pretrain"]},
        {
            "recipe": "recipe.yaml",
            "overrides": [
                f"save_folder={tmp_path / 'extend'}",
                "run_name=extend",
                "data.max_seq_len=96",
                "model.overrides.global_rope_theta=40000.0",
            ],
        },  # fmt: skip
        {
            "recipe": "recipe.yaml",
            "overrides": [
                f"save_folder={tmp_path / 'decay'}",
                "run_name=decay",
                "scheduler.t_warmup=0ba",
                "scheduler.t_decay=1dur",
            ],
        },  # fmt: skip
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"phases": phases}))
    return path, [tmp_path / name for name in ("pretrain", "extend", "decay")]


def run_pipeline(path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        pipeline_command(path), cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def optimizer_steps(checkpoint) -> list[int]:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return [int(group["step"]) for group in saved["state"]["optimizers"]["StableAdamW"]["param_groups"]]


@pytest.mark.slow
def test_three_phases_chain_and_a_rerun_continues_where_it_stopped(tmp_path, write_recipe):
    path, (pretrain, extend, decay) = write_pipeline(tmp_path, write_recipe)
    run_pipeline(path)
    for folder in (pretrain, extend, decay):
        assert [row["batch"] for row in read_metrics(folder / "metrics.jsonl")] == [1, 2, 3, 4]
    extended = yaml.safe_load((extend / "config.yaml").read_text())
    assert extended["load_path"] == str(pretrain) and extended["reset_time"] is True  # its newest checkpoint
    assert extended["data"]["max_seq_len"] == 96  # each phase's resolved config, apart
    # the optimizer's step count runs on through the phases: its moments were carried, not restarted
    assert optimizer_steps(decay / "ep0-ba4-rank0.pt") == [12, 12]
    straight = {folder.name: losses_by_batch(folder / "metrics.jsonl") for folder in (extend, decay)}

    done = run_pipeline(path)  # the same command again: nothing left to do
    assert done.stdout.count("is complete") == 3
    assert [row["batch"] for row in read_metrics(decay / "metrics.jsonl")] == [1, 2, 3, 4]

    # A crash in the middle of the second phase: its batch-2 checkpoint is the latest, the third never began.
    for name in os.listdir(extend):
        if name.startswith("ep0-ba4"):
            os.remove(extend / name)
    os.remove(extend / "latest-rank0.pt")
    os.symlink("ep0-ba2-rank0.pt", extend / "latest-rank0.pt")
    for name in os.listdir(decay):
        os.remove(decay / name)
    done = run_pipeline(path)
    assert done.stdout.count("is complete") == 1  # the first phase only
    for folder in (extend, decay):
        resumed = losses_by_batch(folder / "metrics.jsonl")
        assert sorted(resumed) == [1, 2, 3, 4]
        assert resumed == pytest.approx(straight[folder.name], rel=1e-6), folder.name


def test_bad_pipelines_are_one_line_errors(tmp_path, write_recipe):
    write_recipe()  # tmp_path/recipe.yaml
    cases = {
        "phases: []": "expected 'phases:'",
        "phases: [missing.yaml]": "phases.0.recipe: no recipe at",
        "phases: [{recipe: recipe.yaml, extra: 1}]": "phases.0: unknown key 'extra'",
        "phases: [recipe.yaml, recipe.yaml]": "phases.1: save_folder",
        "phases: [recipe.yaml]\nname: x": "unknown key 'name'",
        "phases: [{recipe: recipe.yaml, overrides: [nope=1]}]": "nope",
        "phases: [{recipe: recipe.yaml, overrides: ['model.overrides=[1]']}]": "must be a mapping",
        "phases: [recipe.yaml]\n# \udcff": "not UTF-8 text",
    }
    for text, message in cases.items():
        path = tmp_path / "pipeline.yaml"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(ConfigError, match=message) as error:
            load_pipeline(path)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "path", sorted((REPO / "yamls").rglob("*pipeline.yaml")), ids=lambda p: str(p.relative_to(REPO))
)
def test_shipped_pipelines_load(path):
    phases = load_pipeline(path)
    assert len(phases) == 3 and len({phase.save_folder for phase in phases}) == 3
