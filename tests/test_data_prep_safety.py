"""modernbert-data refuses an output that holds or lies inside an input (--overwrite would delete the
input), and a shard run that finds no documents is an error that writes nothing."""

import json

import pytest

from data_prep.cli import main


@pytest.fixture
def corpus(tmp_path):
    raw = tmp_path / "corpus" / "raw"
    raw.mkdir(parents=True)
    (raw / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    return raw


def shard(capsys, tiny_data, *args) -> tuple[int, str]:
    code = main(["shard", "--tokenizer", str(tiny_data / "tokenizer"), *map(str, args)])
    return code, capsys.readouterr().err.strip()


def test_an_output_holding_the_input_is_refused_and_the_input_kept(corpus, tiny_data, capsys):
    before = (corpus / "docs.jsonl").read_text()
    code, err = shard(capsys, tiny_data, "--input", corpus, "--output", corpus.parent, "--overwrite")
    assert code == 2
    expected = f"--output {corpus.parent}: holds --input {corpus}; choose an output outside the input"
    assert err == f"modernbert-data shard: error: {expected}"
    assert (corpus / "docs.jsonl").read_text() == before

    code, err = shard(capsys, tiny_data, "--input", corpus, "--output", corpus, "--overwrite")
    assert code == 2 and "holds --input" in err and (corpus / "docs.jsonl").read_text() == before


def test_an_output_inside_the_input_is_refused(corpus, tiny_data, capsys):
    code, err = shard(capsys, tiny_data, "--input", corpus, "--output", corpus / "mds")
    assert code == 2 and f"--output {corpus / 'mds'}: lies inside --input {corpus}" in err
    assert not (corpus / "mds").exists()


def test_an_output_whose_folder_cannot_be_made_is_named(corpus, tiny_data, capsys, tmp_path):
    """It failed at the hidden staging folder: a bare NotADirectoryError or PermissionError, exit 1."""
    import os

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, err = shard(capsys, tiny_data, "--input", corpus, "--output", a_file / "mds")
    assert code == 2 and err.endswith(f"--output {a_file / 'mds'}: cannot create it: {a_file} is a file")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        code, err = shard(capsys, tiny_data, "--input", corpus, "--output", locked / "mds")
        assert code == 2 and err.endswith(f"cannot create it: {locked} is not writable")


def test_no_documents_is_an_error_and_writes_nothing(corpus, tiny_data, capsys, tmp_path):
    out = tmp_path / "mds"
    code, err = shard(capsys, tiny_data, "--input", corpus, "--output", out, "--text-field", "body")
    assert code == 2
    assert "no documents to write: no input record had text in field 'body' (see --text-field)" in err
    assert not out.exists() and list(tmp_path.glob("mds*")) == []


def test_ctrl_c_while_sharding_with_workers_is_one_line_and_leaves_nothing(tiny_data, tmp_path):
    """Ctrl-C reaches the whole process group: each pool worker printed its own KeyboardInterrupt traceback
    (about 36 lines) above the parent's one line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, run_env

    line = json.dumps({"text": "def spam(eggs):\n    return [egg * 2 for egg in eggs if egg]\n" * 40}) + "\n"
    (tmp_path / "big.jsonl").write_text(line * 20_000)
    out = tmp_path / "shards"
    tokenizer = tiny_data / "tokenizer"
    command = [sys.executable, "-m", "data_prep.cli", "shard", "--input", str(tmp_path / "big.jsonl"),
               "--output", str(out), "--tokenizer", str(tokenizer), "--workers", "2"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env=run_env(), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while (
        not any(p.name.startswith("shards.tmp-") for p in tmp_path.iterdir()) and time.monotonic() < deadline
    ):
        time.sleep(0.05)  # its staging folder: the workers are at work
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
    _, err = process.communicate(timeout=60)
    # 130, or (seen 1 in 4 here) death by SIGINT after the line was printed: both are Ctrl-C to a shell
    assert process.returncode in (130, -signal.SIGINT), err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["big.jsonl"]
