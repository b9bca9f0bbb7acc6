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


def test_no_documents_is_an_error_and_writes_nothing(corpus, tiny_data, capsys, tmp_path):
    out = tmp_path / "mds"
    code, err = shard(capsys, tiny_data, "--input", corpus, "--output", out, "--text-field", "body")
    assert code == 2
    assert "no documents to write: no input record had text in field 'body' (see --text-field)" in err
    assert not out.exists() and list(tmp_path.glob("mds*")) == []
