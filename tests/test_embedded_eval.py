"""make eval (finetune/embedded_eval.py): --output is checked before any work, written whole, and a failed
run leaves no work folder behind; other files' errors are not blamed on MODEL_DIR. Training is faked here
(test_finetune.py runs the real thing)."""

import json
import os

import pytest

from modernbert_train.finetune import embedded_eval
from modernbert_train.finetune.data import FinetuneError


@pytest.fixture
def fake_training(monkeypatch):
    """evaluate() without a model or training: each start scores from `accuracies`; calls are recorded."""
    calls = []
    accuracies = {"pretrained": 0.9, "random_init": 0.3}

    def build_task(name, mask, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("{}\n")
        return {"train": folder / "train.jsonl", "eval": folder / "train.jsonl"}

    def finetune(model_dir, train, evaluation, output, settings):
        calls.append(output)
        if accuracies.get("fail"):
            raise FinetuneError("seed 0, epoch 1: the training loss is nan")
        output.mkdir(parents=True, exist_ok=True)
        score = accuracies["random_init" if settings.random_init else "pretrained"]
        return {"final": {"accuracy": {"mean": score, "std": 0.01}}}

    monkeypatch.setattr(embedded_eval, "mask_token", lambda model_dir: "[MASK]")
    monkeypatch.setattr(embedded_eval, "build_task", build_task)
    monkeypatch.setattr(embedded_eval, "finetune", finetune)
    return calls, accuracies


def run_main(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit:
        embedded_eval.main([str(arg) for arg in argv])
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return exit.value.code, error


@pytest.mark.parametrize(
    "output, expected",
    [
        ("folder", "is a folder; name a file for the scores, such as eval.json"),
        ("eval", "needs a suffix such as .json (the work folder is OUTPUT without it)"),
        ("file.txt/eval.json", "cannot create it: {tmp}/file.txt is a file"),
        ("taken.json", "its work folder {tmp}/taken is a file"),
        # The exported folder is handed on as it is: the task and its runs were written into it.
        (
            "model.json",
            "its work folder {tmp}/model would write the task and its runs into the model folder "
            "{tmp}/model; name a file outside it, such as runs/default/eval.json",
        ),
        (
            "model/eval.json",
            "its work folder {tmp}/model/eval would write the task and its runs into the "
            "model folder {tmp}/model; name a file outside it, such as runs/default/eval.json",
        ),
    ],
)
def test_output_problems_are_refused_before_any_work(tmp_path, capsys, fake_training, output, expected):
    """These failed with IsADirectoryError/NotADirectoryError tracebacks, after all the training."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "taken").write_text("a file where the work folder would go")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, error = run_main(capsys, tmp_path / "model", "--output", tmp_path / output)
    assert code == 2
    assert error == f"embedded_eval: error: --output {tmp_path / output}: {expected.format(tmp=tmp_path)}"
    calls, _ = fake_training
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(FinetuneError, match="^--output "):  # evaluate() itself checks too
        embedded_eval.evaluate(tmp_path / "model", tmp_path / output)


def test_eval_json_is_replaced_whole_and_a_failed_run_leaves_no_work_folder(tmp_path, fake_training):
    calls, accuracies = fake_training
    output = tmp_path / "eval.json"
    output.write_text("an earlier run's scores")
    inode = os.stat(output).st_ino
    summary = embedded_eval.evaluate(tmp_path / "model", output, settings={"seeds": [0, 1]})
    assert json.loads(output.read_text()) == json.loads(json.dumps(summary))
    # Staged beside it and renamed into place (a new file), not rewritten where a reader may be reading.
    assert os.stat(output).st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "eval.json"]

    accuracies["fail"] = True
    fresh = tmp_path / "again.json"
    with pytest.raises(FinetuneError):
        embedded_eval.evaluate(tmp_path / "model", fresh)
    assert calls[-1] == tmp_path / "again" / "keyword-pretrained"
    assert not (tmp_path / "again").exists() and not fresh.exists()  # its work folder: removed
    with pytest.raises(FinetuneError):  # an earlier run's work folder is left as it was
        embedded_eval.evaluate(tmp_path / "model", output)
    assert (tmp_path / "eval" / "keyword-pretrained").is_dir()
    assert json.loads(output.read_text())["pretrained"] == 0.9


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            FileNotFoundError(2, "No such file or directory", "/gone/train.jsonl"),
            "/gone/train.jsonl: nothing there",
        ),
        (
            IsADirectoryError(21, "Is a directory", "/somewhere/eval.json"),
            "/somewhere/eval.json: Is a directory",
        ),
        (PermissionError(13, "Permission denied", "/ro/eval.json"), "/ro/eval.json: Permission denied"),
    ],
)
def test_other_files_errors_are_one_line_naming_that_file(tmp_path, capsys, monkeypatch, error, expected):
    """A missing file other than MODEL_DIR was reported as "MODEL_DIR: nothing there"; others, tracebacks."""

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(embedded_eval, "evaluate", fails)
    code, message = run_main(capsys, tmp_path / "model", "--output", tmp_path / "eval.json")
    assert code == 2 and message == f"embedded_eval: error: {expected}"
