"""Phase changes (pretrain -> context extension: new RoPE theta, reset_time) and bad-checkpoint errors."""

import json
import shutil

import pytest
import torch
from composer.core import Callback
from conftest import read_metrics, run_train

from modernbert_train.train.checkpoint import CheckpointError, read_checkpoint
from modernbert_train.train.config import load_config
from modernbert_train.train.main import main
from modernbert_train.train.run import build_run
from modernbert_train.train.run_metadata import metadata_from_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("phases")]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_data):
    """Phase 1: 8 steps at global theta 10k; its last checkpoint."""
    folder = tmp_path_factory.mktemp("pretrain")
    recipe = folder / "pretrain.yaml"
    recipe.write_text(
        f"""
run_name: pretrain
max_duration: 8ba
global_train_batch_size: 8
model: {{preset: tiny, overrides: {{global_rope_theta: 10000.0}}}}
data: {{train: [{{local: {tiny_data / "train"}}}], max_seq_len: 64, lookahead: 16}}
optimizer: {{lr: 3.0e-3}}
scheduler: {{t_warmup: 2ba, t_decay: 0ba}}
log_interval: 1ba
save_folder: {folder / "run"}
save_interval: 8ba
progress_bar: false
"""
    )
    run_train(recipe)
    return folder / "run"


def test_context_extension_loads_with_new_theta_and_restarts_time(pretrained, write_recipe, tmp_path):
    recipe = write_recipe(
        run_name="extension",
        max_duration="4ba",
        load_path=str(pretrained / "ep0-ba8-rank0.pt"),
        reset_time=True,
        model={"overrides": {"global_rope_theta": 160000.0, "local_rope_theta": 10000.0}},
        data={"max_seq_len": 128, "eval": []},
        optimizer={"lr": 1e-3},
        scheduler={"name": "constant", "t_warmup": "0ba", "t_decay": None},
    )
    run_train(recipe)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["batch"] for row in rows] == [1, 2, 3, 4]  # time restarted at zero
    # This phase's schedule and lr, not the checkpoint's.
    assert [row["lr-StableAdamW/group0"] for row in rows] == pytest.approx([1e-3] * 4)
    # Trained weights came along: the first loss is far below a fresh model's.
    first_pretrain_loss = read_metrics(pretrained / "metrics.jsonl")[0]["loss/train/total"]
    assert rows[0]["loss/train/total"] < first_pretrain_loss - 0.3
    metadata = metadata_from_checkpoint(read_checkpoint(tmp_path / "run" / "ep0-ba4-rank0.pt"))
    assert metadata["model_config"]["global_rope_theta"] == 160000.0


class LastGradients(Callback):
    """The latest batch's gradients by parameter name, taken after backward, before the optimizer step."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def after_train_batch(self, state, logger) -> None:
        named = state.model.named_parameters()
        self.grads = {name: p.grad.detach().clone() for name, p in named if p.grad is not None}


def debiased_beta(beta: float, step: int) -> float:
    """torch-optimi keeps Adam's bias-corrected moments, so its beta at step t is the one that maps the
    corrected moment of t - 1 to that of t: m_t = b m_(t-1) + (1 - b) g with
    b = beta (1 - beta^(t-1)) / (1 - beta^t)."""
    return beta * (1 - beta ** (step - 1)) / (1 - beta**step)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def test_phase_change_continues_the_optimizer_moments(pretrained, write_recipe, tmp_path):
    """One batch into a new phase, the moments are the old ones moved by that batch's gradient with the new
    betas, and the step count goes on from the checkpoint's."""
    recipe = write_recipe(
        run_name="decay",
        max_duration="1ba",
        save_interval="1ba",
        load_path=str(pretrained / "ep0-ba8-rank0.pt"),
        reset_time=True,
        data={"eval": []},
        optimizer={"lr": 1e-3, "betas": [0.8, 0.95], "eps": 1e-7, "weight_decay": 1e-4},
        scheduler={"name": "constant", "t_warmup": "0ba", "t_decay": None},
    )
    run = build_run(load_config(recipe))
    last = LastGradients()
    run.trainer.state.callbacks.append(last)
    run.fit()

    before = read_checkpoint(pretrained / "ep0-ba8-rank0.pt")["state"]["optimizers"]["StableAdamW"]
    after = read_checkpoint(tmp_path / "run" / "ep0-ba1-rank0.pt")["state"]["optimizers"]["StableAdamW"]
    for group in after["param_groups"]:
        assert group["step"].item() == 9  # 8 in the first phase, then one more
        # This recipe's hyperparameters, not the checkpoint's.
        assert (group["lr"], group["beta1"], group["beta2"], group["eps"]) == (1e-3, 0.8, 0.95, 1e-7)
    assert [group["weight_decay"] for group in after["param_groups"]] == [1e-4, 0.0]
    beta1, beta2 = debiased_beta(0.8, 9), debiased_beta(0.95, 9)
    assert sorted(last.grads) == sorted(after["state"])  # every parameter had a gradient and a state
    for name, grad in last.grads.items():
        old, new, grad = before["state"][name], after["state"][name], grad.double()
        first = beta1 * old["exp_avg"].double() + (1 - beta1) * grad
        second = beta2 * old["exp_avg_sq"].double() + (1 - beta2) * grad * grad
        assert relative_error(new["exp_avg"], first) < 1e-6, name
        assert relative_error(new["exp_avg_sq"], second) < 1e-6, name
        assert new["eps_sq"].item() == pytest.approx(1e-14)  # the new eps, squared


def error_from_main(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modernbert-train: error: ")
    return lines[0]


def test_missing_checkpoint(write_recipe, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert error_from_main([write_recipe(), f"load_path={missing}"], capsys).endswith(
        f"checkpoint not found: {missing}"
    )


def test_truncated_checkpoint(pretrained, write_recipe, tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    data = (pretrained / "ep0-ba8-rank0.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    message = error_from_main([write_recipe(), f"load_path={truncated}"], capsys)
    assert f"checkpoint {truncated} cannot be read (truncated or not a checkpoint)" in message


def test_checkpoint_of_another_model_shape(pretrained, write_recipe, tmp_path, capsys):
    copy = tmp_path / "other.pt"
    shutil.copy(pretrained / "ep0-ba8-rank0.pt", copy)
    message = error_from_main([write_recipe(), f"load_path={copy}", "model.overrides.hidden_size=32"], capsys)
    assert f"checkpoint {copy} holds another model: hidden_size=64 there, 32 here" in message


def test_shards_of_another_tokenizer(write_recipe, tiny_data, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_data / "val", shards)
    metadata = json.loads((shards / "modernbert_data.json").read_text())
    metadata["tokenizer"]["vocab_size"] = 50368
    (shards / "modernbert_data.json").write_text(json.dumps(metadata))
    message = error_from_main([write_recipe(data={"eval": [{"local": str(shards)}]})], capsys)
    assert (
        f"data.eval.0.local: {shards} was tokenized with another tokenizer (vocab_size=50368 there" in message
    )


def test_a_bucket_checkpoint_of_another_model_shape_is_named_as_such(
    pretrained, write_recipe, s3_bucket, capsys
):
    """It was reported as "checkpoint not found" (a URI is no local path), hiding the mismatch."""
    from modernbert_train import storage

    uri = storage.join(s3_bucket, "pretrain", "ep0-ba8-rank0.pt")
    storage.upload_file(pretrained / "ep0-ba8-rank0.pt", uri)
    with pytest.raises(SystemExit) as exited:
        main([str(write_recipe()), f"load_path={uri}", "model.overrides.hidden_size=32"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err  # above the line: Composer's download progress
    assert err.strip().splitlines()[-1] == (
        f"modernbert-train: error: checkpoint {uri} holds another model: hidden_size=64 there, 32 here"
    )
    gone = storage.join(s3_bucket, "pretrain", "gone.pt")
    message = error_from_main([write_recipe(), f"load_path={gone}", "reset_time=true"], capsys)
    assert message.endswith(f"checkpoint not found: {gone}")


def test_load_path_of_a_save_folder_loads_its_newest_checkpoint_locally_and_from_a_bucket(
    pretrained, write_recipe, tmp_path, s3_bucket
):
    """What a pipeline's next phase loads: a bucket keeps no latest-rank0.pt to name the last checkpoint."""
    from modernbert_train import storage
    from modernbert_train.train.start import StartKind, decide_start

    remote = storage.join(s3_bucket, "pretrain")
    for name in ("ep0-ba8-rank0.pt", "ep0-ba8-rank0.pt.sha256"):
        storage.upload_file(pretrained / name, storage.join(remote, name))
    for load_path, newest in (
        (pretrained, pretrained / "ep0-ba8-rank0.pt"),
        (remote, f"{remote}/ep0-ba8-rank0.pt"),
    ):
        config = load_config(write_recipe(load_path=str(load_path), reset_time=True))
        start = decide_start(config)
        assert (start.kind, start.checkpoint) == (StartKind.PHASE_CHANGE, str(newest))
        assert start.tokenizer_identity is not None  # read from the checkpoint found
    recipe = write_recipe(
        max_duration="1ba",
        load_path=remote,
        reset_time=True,
        data={"eval": []},
        scheduler={"t_warmup": "0ba"},
    )
    run_train(recipe)
    first_pretrain_loss = read_metrics(pretrained / "metrics.jsonl")[0]["loss/train/total"]
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["loss/train/total"] < first_pretrain_loss - 0.3
    (tmp_path / "empty").mkdir()
    config = load_config(write_recipe(load_path=str(tmp_path / "empty"), reset_time=True))
    with pytest.raises(CheckpointError, match="load_path: save_folder .*empty holds no whole checkpoint"):
        decide_start(config)
