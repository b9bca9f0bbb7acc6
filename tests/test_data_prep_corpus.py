"""The default corpus builder, capped to a few hundred kB of the standard library."""

import json

from data_prep import default_corpus
from data_prep.inspect_shards import inspect_folder


def test_default_corpus_builds_train_val_and_tokenizer_once(tmp_path, capsys):
    out = tmp_path / "default"
    argv = ["--output", str(out), "--max-bytes", "200000", "--vocab-size", "512", "--workers", "1"]
    assert default_corpus.main(argv) == 0
    assert "train:" in capsys.readouterr().out
    assert default_corpus.is_complete(out)

    files = default_corpus.select_files(200_000)
    assert files == default_corpus.select_files(200_000)  # deterministic selection
    assert sum(item.path.stat().st_size for item in files) <= 200_000
    assert all("site-packages" not in item.path.parts and "test" not in item.path.parts for item in files)

    train, val = inspect_folder(out / "train"), inspect_folder(out / "val")
    assert val["documents"] >= 1 and train["documents"] > 20 * val["documents"]
    assert "python-stdlib" in train["sources"]
    metadata = json.loads((out / "train" / "modernbert_data.json").read_text())
    assert metadata["tokens"] == train["tokens"] and metadata["tokenizer"]["vocab_size"] % 64 == 0
    assert (out / "train" / "tokenizer.json").read_bytes() == (
        out / "tokenizer" / "tokenizer.json"
    ).read_bytes()

    # Complete output is left alone; --overwrite rebuilds it (same selection, same shards).
    shard_file = out / "train" / "shard.00000.mds.zstd"
    before = shard_file.stat().st_mtime_ns, shard_file.read_bytes()
    assert default_corpus.main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert shard_file.stat().st_mtime_ns == before[0]
    assert default_corpus.main(argv + ["--overwrite"]) == 0
    assert shard_file.stat().st_mtime_ns != before[0] and shard_file.read_bytes() == before[1]
