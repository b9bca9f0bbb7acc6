"""FSDP2's sharded checkpoints (a folder per checkpoint, FSDP's default) as users meet them after a run:
exported and averaged like checkpoint files, compared with another model in one line, and refused in one line
by a run that would load them the other way (see train/checkpoint.py)."""

import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from conftest import REPO, free_port, run_env
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from modernbert_train import storage
from modernbert_train.hf import from_hf
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.train.checkpoint import (
    checkpoint_summary,
    explain_mismatch,
    why_not_loadable,
)
from modernbert_train.train.export import cli


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, tiny_data):
    """Two FSDP2 ranks (gloo) to batch 4 with sharded checkpoints at batches 2 and 4."""
    root = tmp_path_factory.mktemp("sharded")
    recipe = {
        "run_name": "sharded", "seed": 17, "max_duration": "4ba", "global_train_batch_size": 8,
        "model": {"preset": "tiny"},
        "data": {"train": [{"local": str(tiny_data / "train")}], "eval": [], "max_seq_len": 64,
                 "lookahead": 16},
        "optimizer": {"lr": 3e-3}, "scheduler": {"t_warmup": "2ba", "t_decay": "0ba"},
        "log_interval": "1ba", "progress_bar": False, "save_folder": str(root / "run"),
        "save_interval": "2ba",
        "parallelism": {"fsdp": {"state_dict_type": "sharded"}},
    }  # fmt: skip
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", str(free_port()),
               "-m", "modernbert_train.train", str(root / "recipe.yaml")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    folder = root / "run"
    assert (folder / "ep0-ba2" / ".metadata").is_file() and (folder / "ep0-ba4" / ".metadata").is_file()
    return folder


def saved_weights(checkpoint, tmp_path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's model weights as torch gathers the whole folder into one file."""
    whole = tmp_path / f"{checkpoint.name}-whole.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(checkpoint), str(whole))
    model = torch.load(whole, map_location="cpu", weights_only=False)["state"]["model"]
    return {key.removeprefix("model."): value for key, value in model.items()}


def export_cli(capsys, *args) -> tuple[int, str]:
    try:
        cli([str(arg) for arg in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_a_sharded_checkpoint_exports_and_averages_like_a_file(sharded_run, tmp_path, capsys):
    weights = {name: saved_weights(sharded_run / name, tmp_path) for name in ("ep0-ba2", "ep0-ba4")}
    code, err = export_cli(capsys, sharded_run / "ep0-ba4", tmp_path / "hf")
    assert code == 0, err
    exported = from_hf(tmp_path / "hf").state_dict()
    assert exported.keys() == weights["ep0-ba4"].keys()
    for key, value in exported.items():
        assert torch.equal(value, weights["ep0-ba4"][key]), key
    # the tokenizer the run trained with travels in the checkpoint's run metadata
    trained_with = checkpoint_summary(sharded_run / "ep0-ba4").tokenizer_identity
    assert trained_with and (tmp_path / "hf" / "tokenizer.json").is_file()

    checkpoints = [sharded_run / "ep0-ba2", sharded_run / "ep0-ba4"]
    code, err = export_cli(capsys, "--average", *checkpoints, tmp_path / "avg")
    assert code == 0, err
    for key, value in from_hf(tmp_path / "avg").state_dict().items():
        expected = ((weights["ep0-ba2"][key].double() + weights["ep0-ba4"][key].double()) / 2).float()
        assert torch.equal(value, expected), key


@pytest.mark.slow
def test_a_sharded_checkpoint_in_a_bucket_exports(sharded_run, tmp_path, capsys, s3_bucket):
    remote = storage.join(s3_bucket, "run", "ep0-ba4")
    storage.upload_folder(sharded_run / "ep0-ba4", remote)
    code, err = export_cli(capsys, remote, tmp_path / "hf")
    assert code == 0, err
    expected = saved_weights(sharded_run / "ep0-ba4", tmp_path)
    exported = from_hf(tmp_path / "hf").state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in exported.items())


@pytest.mark.slow
def test_an_incomplete_sharded_checkpoint_is_one_line_naming_the_missing_shard(sharded_run, tmp_path, capsys):
    broken = tmp_path / "ep0-ba4"
    shutil.copytree(sharded_run / "ep0-ba4", broken)
    (broken / "__1_0.distcp").unlink()  # rank 1's shard: its upload lost, or the save cut short
    code, err = export_cli(capsys, broken, tmp_path / "hf")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"checkpoint {broken} is incomplete (__1_0.distcp is missing" in err
    assert not (tmp_path / "hf").exists()

    (broken / ".metadata").unlink()
    code, err = export_cli(capsys, broken, tmp_path / "hf")
    assert code == 2 and f"checkpoint {broken} is a folder (a sharded checkpoint) without .metadata" in err


@pytest.mark.slow
def test_a_sharded_checkpoint_of_another_model_is_named_from_its_metadata(sharded_run):
    saved = checkpoint_summary(sharded_run / "ep0-ba4").model_config
    assert saved is not None and saved["intermediate_size"] == 96
    same = ModernBertConfig.from_dict(saved)
    assert explain_mismatch(sharded_run / "ep0-ba4", ModernBertForMaskedLM(same), same) is None
    other = ModernBertConfig.from_dict({**saved, "intermediate_size": 128})
    folder = sharded_run / "ep0-ba4"
    problem = explain_mismatch(folder, ModernBertForMaskedLM(other), other)
    assert problem == f"checkpoint {folder} holds another model: intermediate_size=96 there, 128 here"


@pytest.mark.slow
def test_a_run_loading_a_checkpoint_the_other_way_is_told_which_setting_loads_it(sharded_run, tmp_path):
    folder = sharded_run / "ep0-ba4"
    for state_dict_type in (None, "full"):
        problem = why_not_loadable(folder, state_dict_type)
        assert problem.startswith(f"checkpoint {folder} is sharded (a folder)")
        assert "parallelism.fsdp.state_dict_type=sharded" in problem
    assert why_not_loadable(folder, "sharded") is None
    whole = tmp_path / "ep0-ba4-rank0.pt"
    whole.write_bytes(b"")  # only its kind is looked at
    assert "set parallelism.fsdp.state_dict_type=full" in why_not_loadable(whole, "sharded")
    assert why_not_loadable(whole, "full") is None and why_not_loadable(whole, None) is None


def train(recipe_path, *overrides, launcher_ranks: int | None = None) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "modernbert_train.train",
        str(recipe_path),
        "max_duration=6ba",
        *overrides,
    ]
    if launcher_ranks:
        command = [sys.executable, "-m", "composer.cli.launcher", "-n", str(launcher_ranks), "--master_port",
                   str(free_port()), *command[1:]]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_runs_that_cannot_load_a_sharded_checkpoint_stop_in_one_line_before_training(sharded_run, tmp_path):
    """Each failed mid-start: without FSDP "Is a directory" (exit 1, 'fix it and rerun'); with another model
    shape a traceback (torch's CheckpointException is a BaseException, past `except Exception`)."""
    recipe = sharded_run.parent / "recipe.yaml"
    folder = sharded_run / "ep0-ba4"
    done = train(recipe, f"load_path={folder}", f"save_folder={tmp_path / 'ddp'}", "parallelism.fsdp=null")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"modernbert-train: error: checkpoint {folder} is sharded (a folder) and this run loads whole "
        "checkpoint files: set parallelism.fsdp.state_dict_type=sharded to continue it (on any number of "
        "ranks), or start a run without FSDP from its weights (modernbert-export, then model.init_from_hf)"
    ]
    done = train(recipe, f"load_path={folder}", f"save_folder={tmp_path / 'wider'}",
                 "model.overrides.intermediate_size=128", launcher_ranks=1)  # fmt: skip
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert (
        f"modernbert-train: error: checkpoint {folder} holds another model: intermediate_size=96 there, "
        "128 here" in done.stderr
    )


@pytest.mark.slow
def test_a_finished_sharded_run_rerun_exports_its_missing_hf_folder(sharded_run, tmp_path):
    """A run killed after its last (sharded) checkpoint but before exporting: the rerun of its command
    exports it, where it warned that the folder could not be read and exported nothing."""
    hf = tmp_path / "hf"
    done = train(
        sharded_run.parent / "recipe.yaml", "max_duration=4ba", "autoresume=true", f"export.hf_dir={hf}"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"exported the final checkpoint {sharded_run / 'ep0-ba4'} to {hf} (it was missing)" in done.stdout
    assert from_hf(hf).config.intermediate_size == 96
