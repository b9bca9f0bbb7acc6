"""Sharding across machines: N tasks into a bucket + merge hold exactly what one task writes."""

import json

import pytest

from data_prep.cli import main
from data_prep.parts import resolve_task, task_from_environment, task_inputs
from data_prep.readers import InputSource
from modernbert_train import storage


def split_corpus(tiny_data, folder, files: int = 7) -> None:
    lines = (tiny_data / "corpus" / "train.jsonl").read_text().splitlines(keepends=True)
    folder.mkdir()
    for i in range(files):
        (folder / f"{i:02d}.jsonl").write_text("".join(lines[i::files]))


def shard(inputs, output, tokenizer, *extra: str) -> int:
    return main(["shard", "--input", str(inputs), "--output", str(output), "--tokenizer", str(tokenizer),
                 "--workers", "1", "--source", "corpus", *extra])  # fmt: skip


@pytest.mark.slow  # five sharding runs
def test_three_tasks_and_merge_equal_one_task(s3_bucket, tiny_data, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    split_corpus(tiny_data, corpus)
    tokenizer = tiny_data / "tokenizer"
    assert shard(corpus, tmp_path / "single", tokenizer) == 0
    output = storage.join(s3_bucket, "mix")
    for index in (0, 2):
        assert shard(corpus, output, tokenizer, "--num-tasks", "3", "--task-index", str(index)) == 0
    capsys.readouterr()
    assert main(["merge", output]) == 2
    assert "1 of 3 parts are missing or unfinished: part-00001-of-00003" in capsys.readouterr().err
    assert shard(corpus, output, tokenizer, "--num-tasks", "3", "--task-index", "1") == 0
    assert shard(corpus, output, tokenizer, "--num-tasks", "3", "--task-index", "1") == 0  # a requeued task
    assert "nothing to do" in capsys.readouterr().out
    assert main(["merge", output]) == 0

    assert main(["inspect", output, "--json"]) == 0
    merged = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main(["inspect", str(tmp_path / "single"), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert merged["documents"] == single["documents"] == 400
    assert merged["tokens"] == single["tokens"] and merged["sources"] == single["sources"]
    metadata = json.loads(storage.read_text(storage.join(output, "modernbert_data.json")))
    assert (metadata["documents"], metadata["tokens"]) == (400, single["tokens"])
    assert storage.exists(storage.join(output, "tokenizer.json"))

    # The same parts merged in a local folder.
    local = tmp_path / "local"
    for i in range(3):
        storage.download_folder(
            storage.join(output, f"part-0000{i}-of-00003"), local / f"part-0000{i}-of-00003"
        )
    assert main(["merge", str(local)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(local), "--json"]) == 0
    assert {k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "path"} == {
        k: v for k, v in merged.items() if k != "path"
    }

    from streaming import StreamingDataset

    from modernbert_train.data.shared_memory import registration_lock

    def streamed(**where) -> list[list[int]]:
        # Registered under the host's lock, as the data layer does: a streaming dataset that picks its shared
        # memory prefix at the same time as a job in another test worker could take that job's prefix.
        with registration_lock():
            dataset = StreamingDataset(**where, shuffle=False, batch_size=1)
        return [sample["input_ids"].tolist() for sample in dataset]

    from_single = streamed(local=str(tmp_path / "single"))
    from_bucket = streamed(remote=output, local=str(tmp_path / "cache"))
    assert from_bucket == from_single == streamed(local=str(local)) and len(from_single) == 400


def test_task_split_is_contiguous_balanced_and_complete(tmp_path):
    sizes = [5, 100, 3, 40, 40, 60, 1, 90]
    inputs = []
    for i, size in enumerate(sizes):
        (tmp_path / f"{i}.txt").write_text("x" * size)
        inputs.append(InputSource(tmp_path / f"{i}.txt", "s"))
    for count in (1, 2, 3, 5, 8, 12):
        shares = [task_inputs(inputs, index, count) for index in range(count)]
        assert [item for share in shares for item in share] == inputs
        if count <= 3:
            assert max(sum(item.path.stat().st_size for item in share) for share in shares) <= 2 * 339 / count


def test_task_defaults_from_slurm_and_kubernetes(monkeypatch):
    for name in (
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "JOB_COMPLETION_INDEX",
    ):
        monkeypatch.delenv(name, raising=False)
    assert task_from_environment() == (0, 1)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert resolve_task(None, 4) == (3, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "11")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert resolve_task(None, None) == (1, 4)
    from data_prep.errors import UsageError

    with pytest.raises(UsageError, match="--task-index 4: must be between 0 and --num-tasks - 1 \\(3\\)"):
        resolve_task(4, None)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "x1")  # a bare ValueError, exit 1
    with pytest.raises(
        UsageError, match="^environment variable SLURM_ARRAY_TASK_ID='x1': expected a non-neg"
    ):
        resolve_task(None, None)
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name)
    with pytest.raises(UsageError, match="^the task index 3 \\(from the environment\\): must be between 0"):
        resolve_task(None, None)  # JOB_COMPLETION_INDEX=3 without --num-tasks: no flag to blame


def test_merge_of_parts_without_a_document_is_an_error(tiny_data, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b"):  # the text field is missing everywhere: each task writes an empty part
        (corpus / f"{name}.jsonl").write_text('{"body": "no text field here"}\n')
    for index in (0, 1):
        assert (
            shard(
                corpus,
                tmp_path / "out",
                tiny_data / "tokenizer",
                "--num-tasks",
                "2",
                "--task-index",
                str(index),
            )
            == 0
        )
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("the 2 parts hold 0 documents together; nothing to merge") and "\n" not in error
    assert not (tmp_path / "out" / "index.json").exists()
    # A damaged part marker, and inspect reading one: named in one line (were a JSONDecodeError or KeyError).
    markers = sorted((tmp_path / "out").glob("*/modernbert_data.json"))
    markers[1].write_text('{"tokenizer": ')
    assert main(["merge", str(tmp_path / "out")]) == 2
    assert f"{markers[1]} is not a modernbert_data.json (not JSON: " in capsys.readouterr().err
    markers[1].write_text('{"columns": {}}')
    assert main(["merge", str(tmp_path / "out")]) == 2
    assert f"{markers[1]} is not a modernbert_data.json (no 'tokenizer')" in capsys.readouterr().err
    assert main(["inspect", str(markers[1].parent)]) == 2
    assert f"{markers[1]} is not a modernbert_data.json (no 'tokenizer')" in capsys.readouterr().err
