"""modernbert-export's target folder: a file or another model's folder is refused in one line (unless
--overwrite), and an export is written beside the target and swapped in, so a failed one changes nothing."""

import json
import os

import pytest
import torch

from modernbert_train import storage
from modernbert_train.hf import from_hf, to_hf
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.train.export import check_export_target, cli, staged_export
from modernbert_train.train.main import main
from modernbert_train.train.run_metadata import RunMetadata


def tiny_model(seed: int) -> ModernBertForMaskedLM:
    torch.manual_seed(seed)
    ids = dict(pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    return ModernBertForMaskedLM(ModernBertConfig.from_preset("tiny", vocab_size=128, **ids))


def export_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        cli([str(a) for a in args])
    return done.value.code, capsys.readouterr().err


def test_a_file_or_another_models_folder_is_refused_in_one_line(tmp_path, capsys):
    # No checkpoint is read: the target is checked first.
    target = tmp_path / "model.bin"
    target.write_text("not a folder")
    code, err = export_cli(capsys, tmp_path / "missing.pt", target)
    assert (
        code == 2
        and err.strip() == f"modernbert-export: error: export target {target} is a file, not a folder"
    )

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (other / "pytorch_model.bin").write_text("weights")
    code, err = export_cli(capsys, tmp_path / "missing.pt", other)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"export target {other} is not empty and not an earlier export" in err and "--overwrite" in err
    assert (other / "pytorch_model.bin").read_text() == "weights"
    # with --overwrite the target passes (the missing checkpoint is then the error)
    code, err = export_cli(capsys, tmp_path / "missing.pt", other, "--overwrite")
    assert code == 2 and "checkpoint not found" in err


def test_an_earlier_export_is_replaced_whole(tmp_path):
    target = tmp_path / "hf"
    with staged_export(target) as staging:
        to_hf(tiny_model(0), staging)
    check_export_target(target, overwrite=False)  # an earlier export may be replaced
    newer = tiny_model(1)
    with staged_export(target) as staging:
        to_hf(newer, staging)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging or old folder left
    for name, tensor in from_hf(target).state_dict().items():
        assert torch.equal(tensor, newer.state_dict()[name]), name


def test_a_failed_export_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "hf"
    with staged_export(target) as staging:
        to_hf(tiny_model(0), staging)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(RuntimeError, match="disk gone"), staged_export(target) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("disk gone")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_an_export_killed_here_leaves_no_stale_copy_behind_the_next_one(tmp_path):
    """A SIGKILL mid-export left `.hf.staging-PID` (a whole model's weights) for good: the rerun, with
    another pid, never reused or removed it. A dead pid's staging copy goes; its old copy only once the
    target is a finished export (killed mid-swap, it is the previous export's only copy); a live process's
    copies stay."""
    target = tmp_path / "hf"
    dead, live = 2**31 - 2, os.getppid()  # no pid is that high (pid_max <= 2**22); our parent runs
    for name in (f".hf.staging-{dead}", f".hf.old-{dead}", f".hf.staging-{live}", ".hf.notes-x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
    with staged_export(target) as staging:  # the target is not an export yet: the dead old copy stays
        to_hf(tiny_model(0), staging)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f".hf.old-{dead}", f".hf.staging-{live}", ".hf.notes-x", "hf"]), left
    with staged_export(target) as staging:
        to_hf(tiny_model(1), staging)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".hf.staging-{live}", ".hf.notes-x", "hf"])


def test_a_run_refuses_another_models_folder_as_its_export_before_it_starts(tmp_path, write_recipe, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("someone else's model")
    with pytest.raises(SystemExit) as done:
        main([str(write_recipe(export={"hf_dir": str(other)}))])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1
    assert f"export target {other} is not empty and not an earlier export (it holds README.md)" in err
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing started


def test_a_bucket_target_is_checked_like_a_folder_and_an_overwrite_leaves_no_stale_objects(
    tmp_path, s3_bucket
):
    from modernbert_train.train.export import ExportTargetError

    other = storage.join(s3_bucket, "models", "bert")
    storage.write_text(storage.join(other, "config.json"), json.dumps({"model_type": "bert"}))
    storage.write_text(storage.join(other, "pytorch_model.bin"), "weights")
    with pytest.raises(
        ExportTargetError, match=r"models/bert is not empty and not an earlier export \(it holds"
    ):
        check_export_target(other, overwrite=False)
    a_file = storage.join(s3_bucket, "models", "bert", "config.json")
    with pytest.raises(ExportTargetError, match="is a file, not a folder"):
        check_export_target(a_file, overwrite=False)

    check_export_target(other, overwrite=True)
    with staged_export(other) as staging:
        to_hf(tiny_model(1), staging)
    assert storage.list_files(other) == ["config.json", "model.safetensors"]  # the old weights are gone
    check_export_target(other, overwrite=False)  # now an earlier export of ours: replaceable
    for key, value in from_hf(other).state_dict().items():
        assert torch.equal(value, tiny_model(1).state_dict()[key]), key
    # Replacing it: config.json, which marks a finished export, goes first and comes back last, so an upload
    # cut short (a kill) leaves a folder no one takes for finished (export_if_missing redoes it).
    with staged_export(other) as staging:
        assert "config.json" not in storage.list_files(other)
        to_hf(tiny_model(2), staging)
    assert storage.list_files(other) == ["config.json", "model.safetensors"]


def test_another_tokenizer_is_refused_and_a_reformatted_one_ships(tmp_path, capsys, s3_bucket):
    """--tokenizer may ship the checkpoint's own tokenizer in another file (reformatted, say), not another
    tokenizer: its ids would name other tokens in the exported model's config."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    def tokenizer(vocab: list[str], path):
        made = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=vocab[4]))
        made.pre_tokenizer = pre_tokenizers.Whitespace()
        made.save(str(path), pretty=path.name.startswith("pretty"))
        return path

    trained = tokenizer(["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "a", "b"], tmp_path / "trained.json")
    model = tiny_model(0)
    metadata = RunMetadata(model.config.to_dict(), str(trained), {}).state_dict()
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state": {"model": weights, "callbacks": {"RunMetadata": metadata}}}, tmp_path / "ck.pt")

    other = tokenizer(["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "a", "b"], tmp_path / "other.json")
    code, err = export_cli(capsys, tmp_path / "ck.pt", tmp_path / "out", "--tokenizer", other)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--tokenizer {other}: not the tokenizer checkpoint {tmp_path / 'ck.pt'} was trained with" in err
    assert not (tmp_path / "out").exists()
    # The same vocabulary with a lowercasing normalizer maps text to other ids: another tokenizer too.
    lowered = Tokenizer.from_file(str(trained))
    lowered.normalizer = normalizers.Lowercase()
    lowered.save(str(tmp_path / "lowered.json"))
    code, err = export_cli(
        capsys, tmp_path / "ck.pt", tmp_path / "out", "--tokenizer", tmp_path / "lowered.json"
    )
    assert code == 2 and "not the tokenizer checkpoint" in err and not (tmp_path / "out").exists()
    missing = tmp_path / "none.json"
    code, err = export_cli(capsys, tmp_path / "ck.pt", tmp_path / "out", "--tokenizer", missing)
    assert code == 2 and f"--tokenizer {missing}: {missing} does not exist" in err

    same = tokenizer(["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "a", "b"], tmp_path / "pretty.json")
    assert same.read_text() != trained.read_text()
    cli([str(tmp_path / "ck.pt"), str(tmp_path / "out"), "--tokenizer", str(same)])
    assert from_hf(tmp_path / "out").config.mask_token_id == 3
    # A bucket's folder holding it, as every path argument may be a URI; a bucket's missing one is named.
    storage.upload_file(same, storage.join(s3_bucket, "tok", "tokenizer.json"))
    cli([str(tmp_path / "ck.pt"), str(tmp_path / "out2"), "--tokenizer", storage.join(s3_bucket, "tok")])
    assert (tmp_path / "out2" / "tokenizer.json").is_file()
    gone = storage.join(s3_bucket, "gone")
    code, err = export_cli(capsys, tmp_path / "ck.pt", tmp_path / "out3", "--tokenizer", gone)
    assert code == 2 and err.strip().endswith(f"--tokenizer {gone}: {gone}/tokenizer.json does not exist")


def write_checkpoint(path, seed: int = 0) -> None:
    from tokenizers import Tokenizer, models

    tokenizer = path.with_suffix(".tokenizer.json")
    Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tokenizer))
    model = tiny_model(seed)
    metadata = RunMetadata(model.config.to_dict(), str(tokenizer), {}).state_dict()
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state": {"model": weights, "callbacks": {"RunMetadata": metadata}}}, path)


def test_a_target_below_a_file_is_refused_naming_it_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("a file where a folder would go")
    target = a_file / "sub"
    # the checkpoint is missing: the target is refused first, as the argument was given
    code, err = export_cli(capsys, tmp_path / "missing.pt", target)
    assert code == 2
    assert (
        err.strip()
        == f"modernbert-export: error: export target {target} cannot be written: {a_file} is a file"
    )
    write_checkpoint(tmp_path / "ck.pt")
    code, err = export_cli(capsys, tmp_path / "ck.pt", target)
    assert code == 2 and err.strip().endswith(f"{a_file} is a file") and ".staging" not in err
    code, err = export_cli(capsys, "--average", tmp_path / "ck.pt", tmp_path / "missing.pt", target)
    assert code == 2 and err.strip().endswith(f"export target {target} cannot be written: {a_file} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ck.pt", "ck.tokenizer.json"]  # no staging


def test_a_transformers_folder_is_named_as_one_not_a_sharded_checkpoint(tmp_path, capsys, s3_bucket):
    hf = tmp_path / "run0" / "hf"
    with staged_export(hf) as staging:
        to_hf(tiny_model(0), staging)
    for args in ([hf, tmp_path / "out"], ["--average", hf, hf.parent, tmp_path / "out"]):
        code, err = export_cli(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"checkpoint {hf} is already a transformers model folder" in err and "nothing to export" in err
        assert "sharded" not in err and not (tmp_path / "out").exists()
    # A folder without them is still taken for a sharded checkpoint.
    code, err = export_cli(capsys, tmp_path / "run0", tmp_path / "out")
    assert code == 2 and "is a folder (a sharded checkpoint)" in err
    # In a bucket too (a prefix there, no object).
    remote = storage.join(s3_bucket, "run0", "hf")
    storage.upload_folder(hf, remote)
    code, err = export_cli(capsys, remote, tmp_path / "out")
    assert code == 2 and f"checkpoint {remote} is already a transformers model folder" in err
