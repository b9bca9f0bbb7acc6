"""modernbert-data: readers, shard, inspect, train-tokenizer, against real files and real MDS shards."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer

from data_prep import shard as shard_module
from data_prep.cli import main
from data_prep.inspect_shards import iter_samples
from data_prep.tokenizer_train import build_tokenizer, save_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROSE = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Encoders read the whole sentence at once; masked tokens are predicted from both sides.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich — naïve café.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(build_tokenizer(PROSE * 20, vocab_size=512), folder)
    return folder


@pytest.fixture(scope="module")
def reference_tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_jsonl(path: Path, records: list, opener=open) -> None:
    with opener(path, "wt", encoding="utf-8") as file:
        file.writelines(json.dumps(r) + "\n" for r in records)


def samples(folder: Path) -> list[dict]:
    return list(iter_samples(folder))


def make_all_formats(root: Path) -> list[tuple[str, str]]:
    """One folder with every input format; returns (source, text) in the order shard must read them."""
    (root / "nested").mkdir(parents=True)
    write_jsonl(root / "a.jsonl", [{"text": PROSE[0]}, {"text": PROSE[1], "id": 7}])
    write_jsonl(root / "b.jsonl.gz", [{"text": PROSE[2]}], opener=gzip.open)
    (root / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(json.dumps({"text": PROSE[3]}).encode())
    )
    pq.write_table(pa.table({"text": [PROSE[4], PROSE[0]], "n": [1, 2]}), root / "d.parquet")
    (root / "nested" / "e.py").write_text(PROSE[2])
    (root / "nested" / "f.txt").write_text(PROSE[3])
    (root / "nested" / "g.bin").write_bytes(b"\x00\x01\x02binary")  # skipped: not text
    (root / ".hidden.txt").write_text("never read")
    texts = [PROSE[0], PROSE[1], PROSE[2], PROSE[3], PROSE[4], PROSE[0], PROSE[2], PROSE[3]]
    return [(root.name, text) for text in texts]


def test_tokenizer_has_modernbert_special_tokens_and_loads_in_transformers(
    tokenizer_dir, reference_tokenizer
):
    from transformers import AutoTokenizer

    vocab = reference_tokenizer.get_vocab_size()
    assert vocab % 64 == 0
    assert [reference_tokenizer.id_to_token(i) for i in range(5)] == [
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[PAD]",
        "[MASK]",
    ]
    # A tiny corpus ends below 512 merges: [unused*] slots pad it to the next multiple of 64.
    unused = [i for i in range(vocab) if reference_tokenizer.id_to_token(i).startswith("[unused")]
    assert len(unused) < 64 and unused == list(range(vocab - len(unused), vocab))
    small = build_tokenizer(["abc abc abc"], vocab_size=512)  # 5 special + 256 bytes + 3 merges
    assert small.get_vocab_size() == 320 and small.id_to_token(319) == "[unused55]"
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    encoded = hf("the lazy dog")["input_ids"]
    assert encoded[0] == hf.cls_token_id and encoded[-1] == hf.sep_token_id
    assert hf.decode(encoded, skip_special_tokens=True) == "the lazy dog"
    # Byte-level: text never seen in training still round-trips.
    assert hf.decode(hf("日本語 ✓")["input_ids"], skip_special_tokens=True) == "日本語 ✓"


def test_train_tokenizer_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"body": t} for t in PROSE * 5])
    code, out, _ = run_cli(
        capsys, "train-tokenizer", "--input", corpus, "--output", tmp_path / "tok", "--vocab-size", 384,
        "--text-field", "body",
    )  # fmt: skip
    assert code == 0 and "tokenizer" in out
    tokenizer = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert tokenizer.get_vocab_size() % 64 == 0 and tokenizer.token_to_id("[MASK]") == 4
    code, _, err = run_cli(
        capsys, "train-tokenizer", "--input", corpus, "--output", tmp_path / "t2", "--vocab-size", 500
    )
    assert code == 2 and "--vocab-size 500" in err and len(err.strip().splitlines()) == 1


def test_train_tokenizer_without_a_document_writes_nothing(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"body": t} for t in PROSE])
    code, _, err = run_cli(
        capsys, "train-tokenizer", "--input", corpus, "--output", tmp_path / "tok", "--vocab-size", 384
    )  # the text is under "body", not the default "text": a byte-level tokenizer without merges was written
    assert code == 2 and "no documents to train on: no input record had text (see --text-field)" in err
    assert list(tmp_path.glob("tok*")) == []


def test_each_input_file_is_read_once_linked_folders_too_and_a_bom_is_no_text(
    tmp_path, capsys, tokenizer_dir, reference_tokenizer
):
    """A file given twice (itself, inside a folder also given, through a link) is sharded once and the
    repeat reported; a symlinked subfolder is read (a link back up is no loop); a UTF-8 BOM starting a jsonl
    file or a text file is dropped (it failed the first record's JSON, and became the text's first char)."""
    inputs, real = tmp_path / "in", tmp_path / "real"
    inputs.mkdir()
    real.mkdir()
    write_jsonl(inputs / "a.jsonl", [{"text": PROSE[0]}, {"text": PROSE[1]}])
    (inputs / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps({"text": PROSE[2]}) + "\n").encode())
    (real / "c.txt").write_bytes(b"\xef\xbb\xbf" + PROSE[3].encode())
    (inputs / "linked").symlink_to(real, target_is_directory=True)
    (real / "up").symlink_to(inputs, target_is_directory=True)  # a loop through the link
    (inputs / "again.jsonl").symlink_to(inputs / "a.jsonl")
    code, out, err = run_cli(
        capsys, "shard", "--input", inputs / "a.jsonl", inputs, inputs / "a.jsonl",
        "--output", tmp_path / "mds", "--tokenizer", tokenizer_dir, "--workers", 1,
    )  # fmt: skip
    assert code == 0, err
    texts = [reference_tokenizer.decode(s["input_ids"].tolist()) for s in samples(tmp_path / "mds")]
    assert texts == [PROSE[0], PROSE[1], PROSE[2], PROSE[3]]
    # a.jsonl inside the folder, again.jsonl (a link to it) and a.jsonl given a second time
    assert "read 3 file(s) reached twice by --input only once" in err
    metadata = json.loads((tmp_path / "mds" / "modernbert_data.json").read_text())
    assert metadata["read_problems"]["duplicate_files_skipped"] == 3 and metadata["documents"] == 4


def test_every_format_in_order_with_exact_tokens(tmp_path, capsys, tokenizer_dir, reference_tokenizer):
    expected = make_all_formats(tmp_path / "docs")
    out = tmp_path / "shards"
    code, stdout, err = run_cli(
        capsys, "shard", "--input", tmp_path / "docs", "--output", out, "--tokenizer", tokenizer_dir
    )
    assert code == 0, err
    assert "binary file" in err and "8 documents" in stdout
    rows = samples(out)
    assert [r["source"] for r in rows] == [source for source, _ in expected]
    assert [r["doc_id"] for r in rows] == list(range(len(expected)))
    for row, (_, text) in zip(rows, expected):
        assert row["input_ids"].dtype == np.uint16
        assert row["input_ids"].tolist() == reference_tokenizer.encode(text, add_special_tokens=False).ids
    metadata = json.loads((out / "modernbert_data.json").read_text())
    assert metadata["documents"] == 8
    assert metadata["tokens"] == sum(
        len(reference_tokenizer.encode(t, add_special_tokens=False)) for _, t in expected
    )
    assert metadata["dtype"] == "uint16" and metadata["tokenizer"]["mask_token_id"] == 4
    assert metadata["read_problems"]["binary_files_skipped"] == 1
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_text_field_source_name_and_special_token_strings(
    tmp_path, capsys, tokenizer_dir, reference_tokenizer
):
    write_jsonl(tmp_path / "web.jsonl", [{"body": "a [MASK] and [CLS] in raw text"}, {"text": "ignored"}])
    out = tmp_path / "shards"
    code, _, err = run_cli(
        capsys, "shard", "--input", tmp_path / "web.jsonl", "--output", out, "--tokenizer",
        tokenizer_dir / "tokenizer.json", "--text-field", "body", "--source", "crawl",
    )  # fmt: skip
    assert code == 0 and "missing text field" in err
    (row,) = samples(out)
    assert row["source"] == "crawl"
    # Special-token strings inside documents are text, never control tokens.
    assert not set(row["input_ids"].tolist()) & {0, 1, 2, 3, 4}


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_workers_encode_input_ids_exactly_as_streaming_does(dtype):
    from streaming.base.format.mds.encodings import mds_decode, mds_encode

    rng = np.random.default_rng(0)
    # Lengths on both sides of each change of the width streaming stores an array's length in.
    for length in (1, 255, 256, 65535, 65536):
        ids = rng.integers(0, 60000, length).astype(dtype)
        column = shard_module.ids_column(ids.tolist(), np.dtype(dtype))
        assert column == mds_encode(f"ndarray:{dtype}", ids), length
        assert np.array_equal(mds_decode(f"ndarray:{dtype}", column), ids)


def test_the_sharding_cli_stays_torch_free_until_its_workers_are_forked():
    """Forked workers start at once; with torch imported the pool spawns them, and each imports torch again
    (seconds each). A module-level import of the data package (it imports torch) made every run spawn:
    10.7M tokens on 2 workers took 9.5 s instead of 6 s here."""
    modules = "data_prep.cli, data_prep.shard, data_prep.readers, data_prep.tokenizer_load, data_prep.parts"
    check = f"import sys, {modules}; print(sorted(m for m in ('torch', 'streaming') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.strip() == "[]"


def test_workers_give_byte_identical_shards(tmp_path, capsys, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(shard_module, "BATCH_CHARS", 300)  # many batches in flight, out of order finishes
    docs = tmp_path / "docs"
    docs.mkdir()
    write_jsonl(docs / "a.jsonl", [{"text": f"{i} " + PROSE[i % 5] * (1 + i % 7)} for i in range(300)])
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        code, _, err = run_cli(
            capsys, "shard", "--input", docs, "--output", out, "--tokenizer", tokenizer_dir,
            "--workers", workers, "--size-limit", "8kb",
        )  # fmt: skip
        assert code == 0, err
        outputs.append(out)
    files = sorted(p.name for p in outputs[0].iterdir())
    assert sum(name.endswith(".mds.zstd") for name in files) > 3
    assert files == sorted(p.name for p in outputs[1].iterdir())
    for name in files:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def test_bad_records_are_skipped_and_reported(tmp_path, capsys, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b"{not json",
        json.dumps({"title": "no text"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   \n\t"}).encode(),
        json.dumps({"text": ""}).encode(),
        b'{"text": "broken \xff\xfe bytes"}',
        b'{"text": "lone \\ud800 surrogate"}',
    ]
    bad.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "shard", "--input", bad, "--output", out, "--tokenizer", tokenizer_dir)
    assert code == 0
    for reason, line in [("invalid JSON", 2), ("missing text field", 3), ("non-string text", 4)]:
        assert reason in err and f"bad.jsonl:{line}" in err
    assert "skipped 2 record(s): empty text" in err and "bad.jsonl:5" in err and "bad.jsonl:6" in err
    assert "replaced 3 undecodable" in err and "bad.jsonl:7" in err and "bad.jsonl:8" in err
    assert "Traceback" not in err
    problems = json.loads((out / "modernbert_data.json").read_text())["read_problems"]
    assert problems["skipped_records"] == {
        "empty text": 2, "invalid JSON": 1, "missing text field": 1, "non-string text": 1
    }  # fmt: skip
    assert problems["replaced_characters"] == 3
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = [tokenizer.decode(row["input_ids"].tolist()) for row in samples(out)]
    assert texts == ["good one", "broken \ufffd\ufffd bytes", "lone \ufffd surrogate"]


def test_documents_without_tokens_are_skipped_by_line(tmp_path, capsys, reference_tokenizer):
    from tokenizers import normalizers

    erasing = Tokenizer.from_str(reference_tokenizer.to_str())
    erasing.normalizer = normalizers.Replace("z", "")  # a document of only z's encodes to nothing
    (tmp_path / "tok").mkdir()
    erasing.save(str(tmp_path / "tok" / "tokenizer.json"))
    write_jsonl(tmp_path / "z.jsonl", [{"text": "keep me"}, {"text": "zzz"}, {"text": "and me"}])
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "shard", "--input", tmp_path / "z.jsonl", "--output", out, "--tokenizer", tmp_path / "tok"
    )
    assert code == 0 and "2 documents" in stdout
    assert "skipped 1 record(s): no tokens" in err and "z.jsonl:2" in err
    rows = samples(out)
    assert [r["doc_id"] for r in rows] == [0, 1]
    assert [erasing.decode(r["input_ids"].tolist()) for r in rows] == ["keep me", "and me"]


def test_unreadable_files_are_reported_and_the_rest_sharded(tmp_path, capsys, tokenizer_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    records = [{"text": f"record number {i} " + PROSE[i % 5]} for i in range(200)]
    write_jsonl(docs / "a_good.jsonl", records[:50])
    full_gzip = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    (docs / "b_truncated.jsonl.gz").write_bytes(full_gzip[: len(full_gzip) // 2])
    full_zstd = zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in records).encode())
    (docs / "c_truncated.jsonl.zst").write_bytes(full_zstd[: len(full_zstd) // 2])
    (docs / "d_garbage.parquet").write_bytes(b"this is not parquet at all")
    # Tests run as root, so permission denied cannot be staged; a dangling symlink fails to open the same way.
    (docs / "e_dangling.txt").symlink_to(tmp_path / "gone.txt")
    (docs / "f_good.txt").write_text(PROSE[1])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "shard", "--input", docs, "--output", out, "--tokenizer", tokenizer_dir)
    assert code == 1
    for name in ("b_truncated.jsonl.gz", "c_truncated.jsonl.zst", "d_garbage.parquet", "e_dangling.txt"):
        assert f"could not read {docs / name}" in err
    assert "Traceback" not in err
    metadata = json.loads((out / "modernbert_data.json").read_text())
    unreadable = {Path(u["file"]).name: u for u in metadata["read_problems"]["unreadable_files"]}
    assert set(unreadable) == {
        "b_truncated.jsonl.gz",
        "c_truncated.jsonl.zst",
        "d_garbage.parquet",
        "e_dangling.txt",
    }
    kept_from_broken = unreadable["b_truncated.jsonl.gz"]["documents_read"]
    kept_from_broken += unreadable["c_truncated.jsonl.zst"]["documents_read"]
    rows = samples(out)
    assert len(rows) == metadata["documents"] == 50 + kept_from_broken + 1
    assert [r["doc_id"] for r in rows[:50]] == list(range(50))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--input", "{tmp}/missing.jsonl"], "--input {tmp}/missing.jsonl"),
        (["--input", "{docs}", "--tokenizer", "{tmp}/nope.json"], "--tokenizer {tmp}/nope.json"),
        (["--input", "{docs}", "--frobnicate"], "--frobnicate"),
        (["--input", "{docs}", "--output", "{docs}"], "holds --input"),
        (["--input", "{docs}", "--workers", "0"], "--workers"),
        (["--input", "{docs}", "--size-limit", "lots"], "--size-limit lots"),
        (["--hf-dataset", "{tmp}/no_such_dataset"], "--hf-dataset {tmp}/no_such_dataset"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(tmp_path, capsys, tokenizer_dir, args, needle):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("text")
    defaults = {"--output": str(tmp_path / "out"), "--tokenizer": str(tokenizer_dir)}
    argv = ["shard"] + [a.format(tmp=tmp_path, docs=docs) for a in args]
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle.format(tmp=tmp_path, docs=docs) in err
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_name_on_a_node_without_the_hub_fails_at_once(tmp_path, capsys, monkeypatch):
    """A local path's typo reads as a hub name; unreachable, the hub client retried for half a minute,
    printing each retry. Nothing answers on the discard port: one line, at once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    (tmp_path / "a.txt").write_text("text")
    started = time.monotonic()
    code, _, err = run_cli(
        capsys, "shard", "--input", tmp_path / "a.txt", "--output", tmp_path / "out", "--tokenizer", "tokk"
    )
    assert code == 2 and time.monotonic() - started < 10
    assert err.strip().splitlines() == [
        "modernbert-data shard: error: --tokenizer tokk: no such local file or folder, and the hub is "
        "unreachable from here (its local cache has no tokenizer.json for it either)"
    ]


def test_overwrite_replaces_output_and_leaves_no_staging(tmp_path, capsys, tokenizer_dir):
    (tmp_path / "one.txt").write_text(PROSE[0])
    (tmp_path / "two.txt").write_text(PROSE[1])
    out = tmp_path / "out"
    assert (
        run_cli(
            capsys, "shard", "--input", tmp_path / "one.txt", "--output", out, "--tokenizer", tokenizer_dir
        )[0]
        == 0
    )
    argv = [
        "shard",
        "--input",
        tmp_path / "two.txt",
        "--output",
        out,
        "--tokenizer",
        tokenizer_dir,
        "--overwrite",
    ]
    assert run_cli(capsys, *argv)[0] == 0
    assert [r["source"] for r in samples(out)] == ["two"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.txt", "out", "two.txt"]


def test_failed_run_leaves_no_output(tmp_path, tokenizer_dir):
    from data_prep.read_report import ReadReport
    from data_prep.readers import Document
    from data_prep.tokenizer_load import load_tokenizer

    def documents_then_failure():
        yield Document(PROSE[0], "s", "x", None)
        raise RuntimeError("disk went away")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        shard_module.shard(
            documents_then_failure(), out, load_tokenizer(str(tokenizer_dir)), report=ReadReport()
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_killed_run_leaves_nothing_that_looks_complete(tmp_path, tokenizer_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    write_jsonl(docs / "big.jsonl", [{"text": f"{i} " + PROSE[i % 5] * 40} for i in range(1500)])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_prep.cli", "shard", "--input", str(docs), "--output", str(out),
               "--tokenizer", str(tokenizer_dir), "--workers", "1", "--size-limit", "16kb"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE)
    staging = tmp_path / f"out.tmp-{process.pid}"
    deadline = time.monotonic() + 60
    while not (staging / "shard.00001.mds.zstd").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the run never started writing shards"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the run and its worker processes
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    assert not out.exists()
    assert not (staging / "modernbert_data.json").exists() and not (staging / "index.json").exists()


def test_inspect_counts_and_histogram(tmp_path, capsys, tokenizer_dir, reference_tokenizer):
    expected = make_all_formats(tmp_path / "docs")
    out = tmp_path / "shards"
    assert (
        run_cli(capsys, "shard", "--input", tmp_path / "docs", "--output", out, "--tokenizer", tokenizer_dir)[
            0
        ]
        == 0
    )
    code, stdout, _ = run_cli(capsys, "inspect", out, "--json")
    assert code == 0
    result = json.loads(stdout)
    lengths = [len(reference_tokenizer.encode(t, add_special_tokens=False)) for _, t in expected]
    assert result["documents"] == len(expected) and result["tokens"] == sum(lengths)
    assert result["sources"] == {"docs": {"documents": len(expected), "tokens": sum(lengths)}}
    histogram = result["length_histogram"]
    assert sum(row["documents"] for row in histogram) == len(expected)
    for row in histogram:
        inside = [n for n in lengths if row["min"] <= n < row["max_exclusive"]]
        assert row["documents"] == len(inside) and row["max_exclusive"] == 2 * row["min"]
    code, stdout, _ = run_cli(capsys, "inspect", out)
    assert code == 0 and f"documents: {len(expected)}" in stdout and "length histogram" in stdout
    code, _, err = run_cli(capsys, "inspect", tmp_path / "docs")
    assert code == 2 and "index.json" in err


def test_shards_read_back_through_streaming_dataset(tmp_path, capsys, tokenizer_dir, reference_tokenizer):
    from streaming import StreamingDataset

    from modernbert_train.data.shared_memory import registration_lock

    expected = make_all_formats(tmp_path / "docs")
    out = tmp_path / "shards"
    run_cli(capsys, "shard", "--input", tmp_path / "docs", "--output", out, "--tokenizer", tokenizer_dir)
    with registration_lock():  # as the data layer registers its datasets (see test_storage_parts)
        dataset = StreamingDataset(local=str(out), batch_size=1, shuffle=False)
    ids = [dataset[i]["input_ids"].tolist() for i in range(dataset.num_samples)]
    assert ids == [reference_tokenizer.encode(text, add_special_tokens=False).ids for _, text in expected]


def test_local_hf_datasets(tmp_path, capsys, tokenizer_dir, reference_tokenizer):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": PROSE[:3], "label": [0, 1, 2]}),
            "test": datasets.Dataset.from_dict({"text": [PROSE[3], None], "label": [3, 4]}),
        }
    ).save_to_disk(str(saved))
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        "shard",
        "--hf-dataset",
        saved,
        "--hf-split",
        "test",
        "--output",
        out,
        "--tokenizer",
        tokenizer_dir,
    )
    assert code == 0 and "missing text field" in err and "saved[test]:2" in err
    rows = samples(out)
    assert [r["input_ids"].tolist() for r in rows] == [
        reference_tokenizer.encode(PROSE[3], add_special_tokens=False).ids
    ]
    assert rows[0]["source"] == "saved"
    code, _, err = run_cli(
        capsys, "shard", "--hf-dataset", saved, "--hf-split", "validation", "--output", tmp_path / "o2",
        "--tokenizer", tokenizer_dir,
    )  # fmt: skip
    assert code == 2 and "--hf-split validation" in err
    # A folder of data files goes through datasets' own builder inference (load_dataset).
    builder = tmp_path / "builder"
    builder.mkdir()
    write_jsonl(builder / "part.jsonl", [{"text": t} for t in PROSE[:2]])
    code, _, err = run_cli(
        capsys, "shard", "--hf-dataset", builder, "--output", tmp_path / "o3", "--tokenizer", tokenizer_dir
    )
    assert code == 0, err
    assert len(samples(tmp_path / "o3")) == 2


def test_a_hub_dataset_name_on_an_offline_node_is_one_line_at_once(
    tmp_path, capsys, tokenizer_dir, monkeypatch
):
    """Only the hub cache is asked: datasets' client retried for about 25 s, printing each retry."""
    import time

    from data_prep import hf_dataset

    monkeypatch.setattr(hf_dataset, "hub_reachable", lambda: False)  # as on an offline GPU node
    started = time.perf_counter()
    code, _, err = run_cli(
        capsys, "shard", "--hf-dataset", "typo-user/no-such-dataset", "--output", tmp_path / "out",
        "--tokenizer", tokenizer_dir,
    )  # fmt: skip
    assert code == 2 and time.perf_counter() - started < 15
    assert err.strip() == (
        "modernbert-data shard: error: --hf-dataset typo-user/no-such-dataset: no such local folder, and the "
        "hub is unreachable from here (its local cache has no split 'train' of it either)"
    )
    assert not (tmp_path / "out").exists()


def test_hf_dataset_without_the_datasets_package_is_a_usage_error(tmp_path, tokenizer_dir):
    # A None entry in sys.modules makes `import datasets` raise ImportError, as on a machine without it.
    script = (
        "import sys; sys.modules['datasets'] = None; from data_prep.cli import main; "
        f"sys.exit(main(['shard', '--hf-dataset', 'wikitext', '--output', {str(tmp_path / 'out')!r}, "
        f"'--tokenizer', {str(tokenizer_dir)!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "--hf-dataset wikitext: needs the `datasets` package" in done.stderr
    assert not (tmp_path / "out").exists()
