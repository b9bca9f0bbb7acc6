"""A short CPU run end to end: metrics.jsonl, the saved recipe, checkpoints with metadata, the HF export."""

import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_metrics, run_env, run_train

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.train.checkpoint import model_weights, read_checkpoint
from modernbert_train.train.config import load_config
from modernbert_train.train.run_metadata import metadata_from_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data):
    """12 steps with eval every 6 and an export at the end."""
    tmp_path = tmp_path_factory.mktemp("finished_run")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
run_name: finished
max_duration: 12ba
global_train_batch_size: 8
model: {{preset: tiny}}
data:
  train: [{{local: {tiny_data / "train"}}}]
  eval: [{{local: {tiny_data / "val"}}}]
  max_seq_len: 64
  lookahead: 16
  eval_batch_size: 8
optimizer: {{lr: 3.0e-3}}
scheduler: {{t_warmup: 2ba, t_decay: 0ba}}
eval_interval: 6ba
eval_subset_num_batches: 2
log_interval: 1ba
save_folder: {tmp_path / "run"}
save_interval: 6ba
progress_bar: false
export: {{hf_dir: {tmp_path / "hf"}}}
"""
    )
    done = run_train(recipe)
    return tmp_path, done


def test_metrics_jsonl_has_one_row_per_step_with_loss_lr_and_throughput(finished_run):
    tmp_path, _ = finished_run
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["batch"] for row in rows] == list(range(1, 13))
    for row in rows:
        assert math.isfinite(row["loss/train/total"])
        assert row["throughput/tokens_per_sec"] > 0
        assert row["samples"] == 8 * row["batch"]
    # The lr each step trained with: a 2-batch linear warmup from 0, then constant.
    lrs = [row["lr-StableAdamW/group0"] for row in rows]
    assert lrs[:3] == pytest.approx([0.0, 1.5e-3, 3e-3]) and lrs[-1] == pytest.approx(3e-3)
    assert rows[-1]["loss/train/total"] < rows[0]["loss/train/total"] - 0.5
    evaluated = [row["batch"] for row in rows if "metrics/eval/MLMLoss" in row]
    assert evaluated == [6, 12]
    assert 0 <= rows[-1]["metrics/eval/MLMAccuracy"] <= 1


def test_resolved_recipe_is_saved_and_reloads(finished_run):
    tmp_path, _ = finished_run
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved == load_config(tmp_path / "recipe.yaml")


def test_checkpoints_carry_model_config_and_tokenizer(finished_run, tiny_data):
    tmp_path, _ = finished_run
    assert sorted(p.name for p in (tmp_path / "run").glob("ep*.pt")) == [
        "ep0-ba12-rank0.pt",
        "ep0-ba6-rank0.pt",
    ]
    metadata = metadata_from_checkpoint(read_checkpoint(tmp_path / "run" / "ep0-ba12-rank0.pt"))
    assert metadata["model_config"]["hidden_size"] == 64
    assert metadata["model_config"]["vocab_size"] == 384  # the data's tokenizer, padded to 64
    assert metadata["tokenizer_json"] == (tiny_data / "train" / "tokenizer.json").read_text()


def test_the_cpu_name_is_read_without_a_subprocess(finished_run):
    """Composer records the host CPU's name in the Trainer's hyperparameters and every checkpoint; py-cpuinfo
    would run a Python subprocess for it at every rank's start. The run reads /proc/cpuinfo instead, and
    records the same name py-cpuinfo gives."""
    import cpuinfo
    from composer.utils import collect_env

    from modernbert_train.train.run import cpu_model_without_a_subprocess

    tmp_path, _ = finished_run
    saved = read_checkpoint(tmp_path / "run" / "ep0-ba12-rank0.pt")["state"]["metadata"]["composer_env_info"]
    expected = cpuinfo.get_cpu_info()["brand_raw"]
    assert saved["cpu_model"] == expected
    original = collect_env.get_cpu_model
    try:
        cpu_model_without_a_subprocess()
        cpu_model_without_a_subprocess()  # once is enough: a second call changes nothing
        assert collect_env.get_cpu_model.func.__name__ == "_cpu_model_from_proc"
        started = []
        real_popen = subprocess.Popen.__init__

        def record(self, *args, **kwargs):
            started.append(args)
            real_popen(self, *args, **kwargs)

        subprocess.Popen.__init__ = record
        try:
            assert collect_env.get_composer_env_dict()["cpu_model"] == expected
        finally:
            subprocess.Popen.__init__ = real_popen
        with open("/proc/cpuinfo") as f:
            kernel_names_it = any(line.startswith("model name") for line in f)
        assert started == [] or not kernel_names_it  # ARM hosts: py-cpuinfo as before
    finally:
        collect_env.get_cpu_model = original


def test_export_loads_in_transformers_with_identical_logits(finished_run, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    run_dir, _ = finished_run
    checkpoint = run_dir / "run" / "ep0-ba12-rank0.pt"
    subprocess.run(
        [sys.executable, "-m", "modernbert_train.train.export", str(checkpoint), str(tmp_path / "exported")],
        cwd=REPO,
        env=run_env(),
        check=True,
        capture_output=True,
    )
    saved = read_checkpoint(checkpoint)
    ours = ModernBertForMaskedLM(ModernBertConfig.from_dict(metadata_from_checkpoint(saved)["model_config"]))
    ours.load_state_dict(model_weights(saved))
    ours.eval()
    for folder in (run_dir / "hf", tmp_path / "exported"):  # the end-of-run export and modernbert-export
        theirs = AutoModelForMaskedLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        batch = tokenizer(
            ["the cat sees a red ball", "our teacher feeds the river at night"],
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            expected = ours(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            actual = theirs(**batch).logits
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(actual[real], expected[real], rtol=1e-4, atol=1e-4)
