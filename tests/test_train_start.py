"""How a run starts (train/start.py): a finished run's command rerun is a no-op that exits 0, a longer
max_duration resumes it, a loaded checkpoint with nothing left to train is refused; under FSDP2 with sharded
checkpoints, on two ranks, the finished rerun and a phase change that continues the optimizer."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from conftest import REPO, free_port, read_metrics, run_env, run_train

from modernbert_train.train.checkpoint import checkpoint_summary
from modernbert_train.train.main import main

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("start")]

LAUNCHER = [sys.executable, "-m", "composer.cli.launcher"]


def write_recipe(path: Path, tiny_data: Path, folder: Path, **keys) -> Path:
    """A 4-batch autoresume recipe saving its last checkpoint into `folder`; `keys` replace top-level keys."""
    recipe = {
        "run_name": "finished",
        "max_duration": "4ba",
        "global_train_batch_size": 8,
        "model": {"preset": "tiny"},
        "data": {"train": [{"local": str(tiny_data / "train")}], "max_seq_len": 64, "lookahead": 16},
        "optimizer": {"lr": 3e-3},
        "scheduler": {"t_warmup": "2ba", "t_decay": "0ba"},
        "log_interval": "1ba",
        "save_folder": str(folder),
        "save_interval": "4ba",
        "autoresume": True,
        "progress_bar": False,
    }
    path.write_text(yaml.safe_dump({**recipe, **keys}))
    return path


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below `folder` (links as their target): contents and modification time."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data) -> Path:
    """A run trained to its max_duration (4 batches) with an export; its recipe."""
    root = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(root / "recipe.yaml", tiny_data, root / "run", export={"hf_dir": str(root / "hf")})
    run_train(recipe)
    return recipe


def test_rerunning_a_finished_run_says_so_and_changes_nothing(finished):
    root = finished.parent
    before = snapshot(root)
    assert {"run/metrics.jsonl", "hf/config.json"} <= set(before)
    done = run_train(finished)  # the same command again
    checkpoint = root / "run" / "ep0-ba4-rank0.pt"
    assert done.stdout.strip().splitlines() == [
        f"modernbert-train: run 'finished' is complete: its latest checkpoint {checkpoint} is at 4ba, "
        "max_duration is 4ba; nothing to do"
    ]
    assert "Traceback" not in done.stderr
    assert snapshot(root) == before  # no metrics row, no export, no config or checkpoint written


def test_a_finished_run_whose_export_was_lost_is_exported_by_the_rerun(finished, tmp_path):
    # A kill after the last checkpoint but before the export swapped in: the rerun exports that checkpoint.
    root = finished.parent
    folder = tmp_path / "run"
    shutil.copytree(root / "run", folder, symlinks=True)
    hf = tmp_path / "hf"
    done = run_train(finished, f"save_folder={folder}", f"export.hf_dir={hf}")
    assert (
        f"exported the final checkpoint {folder / 'ep0-ba4-rank0.pt'} to {hf} (it was missing)" in done.stdout
    )
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (hf / name).read_bytes() == (root / "hf" / name).read_bytes(), name  # the run's own export


def test_a_longer_max_duration_resumes_the_finished_run_unless_a_key_the_checkpoint_fixes_changed(
    finished, tmp_path, capsys
):
    shutil.copytree(finished.parent / "run", tmp_path / "run", symlinks=True)
    overrides = [f"save_folder={tmp_path / 'run'}", f"export.hf_dir={tmp_path / 'hf'}", "max_duration=6ba"]
    before = snapshot(tmp_path / "run")
    with pytest.raises(SystemExit) as exited:  # the checkpoint's moments and lr would be kept: refused
        main([str(finished), *overrides, "optimizer.lr=0.01"])
    assert exited.value.code == 2
    checkpoint = tmp_path / "run" / "ep0-ba4-rank0.pt"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"modernbert-train: error: recipe changed since checkpoint {checkpoint}: optimizer.lr=0.003 there, "
        "0.01 here; a resumed run continues its optimizer, data stream and RNG, so these keys cannot change: "
        f"put them back, or start a new phase with load_path={checkpoint} reset_time=true (in another "
        "save_folder when autoresuming)"
    ]
    assert snapshot(tmp_path / "run") == before and not (tmp_path / "hf").exists()
    run_train(finished, *overrides, "scheduler.t_decay=2ba")  # the lock was released; a new schedule is free
    assert [row["batch"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "hf" / "config.json").exists()


def test_a_loaded_checkpoint_with_nothing_left_to_train_is_refused(finished, tmp_path, capsys):
    checkpoint = finished.parent / "run" / "ep0-ba4-rank0.pt"
    args = [finished, f"save_folder={tmp_path / 'run'}", "autoresume=false", f"load_path={checkpoint}"]
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"modernbert-train: error: load_path: checkpoint {checkpoint} is already at 4ba and max_duration is "
        "4ba, so nothing would train; a new phase needs reset_time=true"
    ]


def test_a_fresh_run_over_a_finished_one_is_refused_then_replaces_it_under_save_overwrite(
    finished, tmp_path, capsys
):
    folder = tmp_path / "run"
    shutil.copytree(finished.parent / "run", folder, symlinks=True)
    before = snapshot(folder)
    args = [f"save_folder={folder}", f"export.hf_dir={tmp_path / 'hf'}", "max_duration=2ba"]
    args.append("save_interval=2ba")
    with pytest.raises(SystemExit) as exited:
        main([str(finished), *args, "autoresume=false"])
    assert exited.value.code == 2
    assert "holds an earlier run (ep0-ba4-rank0.pt," in capsys.readouterr().err
    assert snapshot(folder) == before and not (tmp_path / "hf").exists()
    run_train(finished, *args, "autoresume=false", "save_overwrite=true")
    # Only this run's rows and checkpoint: the earlier ba4 one would have been "newer" to a later autoresume.
    assert [row["batch"] for row in read_metrics(folder / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in folder.glob("ep*")) == ["ep0-ba2-rank0.pt", "ep0-ba2-rank0.pt.sha256"]
    done = run_train(finished, *args)  # autoresume: this run is complete at its own 2ba
    assert f"its latest checkpoint {folder / 'ep0-ba2-rank0.pt'} is at 2ba" in done.stdout


def test_an_autoresumed_run_killed_before_its_first_checkpoint_restarts_with_one_row_per_batch(
    finished, tmp_path
):
    folder = tmp_path / "run"
    folder.mkdir()
    # What a kill before the first save leaves: rows of batches 1-3 and no checkpoint.
    rows = [{"batch": b, "loss/train/total": 9.0} for b in (1, 2, 3)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_train(finished, f"save_folder={folder}", f"export.hf_dir={tmp_path / 'hf'}")
    rows = read_metrics(folder / "metrics.jsonl")
    assert [row["batch"] for row in rows] == [1, 2, 3, 4]
    assert all(row["loss/train/total"] != 9.0 for row in rows)


def launch(recipe: Path, log: Path, timeout: float = 420, *overrides: str, fails: bool = False) -> str:
    """`composer -n 2 -m modernbert_train.train RECIPE [OVERRIDES]`; its console output (every rank's)."""
    port = str(free_port())
    command = [*LAUNCHER, "-n", "2", "--master_port", port, "-m", "modernbert_train.train", str(recipe)]
    command += overrides
    with log.open("w+b") as out:
        process = subprocess.run(
            command, cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
        out.seek(0)
        output = out.read().decode(errors="replace")
    assert (process.returncode != 0) if fails else (process.returncode == 0), output[-4000:]
    return output


def sharded_param_groups(folder: Path) -> list[dict]:
    """The optimizer's group bookkeeping from a sharded checkpoint, read on one process."""
    keys = ("lr", "beta1", "beta2", "eps", "weight_decay")
    groups = [{**dict.fromkeys(keys, 0.0), "step": torch.zeros((), dtype=torch.int32)} for _ in range(2)]
    saved = {"state": {"optimizers": {"StableAdamW": {"param_groups": groups}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(saved, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    return groups


def test_sharded_fsdp_finished_rerun_and_phase_change_on_two_ranks(tmp_path, tiny_data):
    fsdp = {"fsdp": {"state_dict_type": "sharded"}}
    recipe = write_recipe(tmp_path / "pretrain.yaml", tiny_data, tmp_path / "pretrain", parallelism=fsdp)
    launch(recipe, tmp_path / "pretrain.log")
    assert (tmp_path / "pretrain" / "ep0-ba4").is_dir()  # a sharded checkpoint is a folder
    before = snapshot(tmp_path / "pretrain")

    output = launch(recipe, tmp_path / "rerun.log")  # the same command again: every rank exits 0
    checkpoint = tmp_path / "pretrain" / "ep0-ba4"
    assert output.count(f"run 'finished' is complete: its latest checkpoint {checkpoint} is at 4ba") == 1
    assert snapshot(tmp_path / "pretrain") == before
    assert checkpoint_summary(checkpoint).recipe["optimizer"]["lr"] == 3e-3  # read from the sharded folder

    # A longer run with another lr would keep the checkpoint's: every rank refuses it, nothing is written.
    output = launch(
        recipe, tmp_path / "refused.log", 420, "max_duration=6ba", "optimizer.lr=0.01", fails=True
    )
    assert "optimizer.lr=0.003 there, 0.01 here" in output and "Traceback" not in output
    assert snapshot(tmp_path / "pretrain") == before

    extension = write_recipe(
        tmp_path / "extension.yaml",
        tiny_data,
        tmp_path / "extension",
        run_name="extension",
        max_duration="1ba",
        save_interval="1ba",
        load_path=str(tmp_path / "pretrain" / "ep0-ba4"),
        reset_time=True,
        optimizer={"lr": 1e-3, "betas": [0.8, 0.95], "eps": 1e-7, "weight_decay": 1e-4},
        scheduler={"name": "constant", "t_warmup": "0ba"},
        parallelism=fsdp,
    )
    launch(extension, tmp_path / "extension.log")
    for group, weight_decay in zip(sharded_param_groups(tmp_path / "extension" / "ep0-ba1"), (1e-4, 0.0)):
        assert group["step"].item() == 5  # the checkpoint's 4, then one more
        assert (group["lr"], group["beta1"], group["beta2"], group["eps"]) == (1e-3, 0.8, 0.95, 1e-7)
        assert group["weight_decay"] == weight_decay
