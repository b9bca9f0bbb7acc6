"""The default corpus builder, capped to a few hundred kB of the standard library."""

import json
import sysconfig
from pathlib import Path

from data_prep import default_corpus
from data_prep.inspect_shards import inspect_folder


def test_default_corpus_builds_train_val_and_tokenizer_once(tmp_path, capsys):
    out = tmp_path / "default"
    argv = ["--output", str(out), "--max-bytes", "200000", "--vocab-size", "512", "--workers", "1"]
    assert default_corpus.main(argv) == 0
    assert "train:" in capsys.readouterr().out
    assert default_corpus.is_complete(out, max_bytes=200_000)
    assert not default_corpus.is_complete(out)  # built with another cap: not the default corpus

    files = default_corpus.select_files(200_000)
    assert files == default_corpus.select_files(200_000)  # deterministic selection
    assert sum(item.path.stat().st_size for item in files) <= 200_000
    assert all("site-packages" not in item.path.parts and "test" not in item.path.parts for item in files)
    # The downstream task's eval modules are never pretrained on.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = [item for item in default_corpus.select_files(10**9) if item.source == "python-stdlib"]
    assert modules and not any(
        default_corpus.held_for_downstream(item.path.relative_to(stdlib).as_posix()) for item in modules
    )

    # Every 32nd file is held out; each file with text is one document (empty __init__.py files are not).
    def with_text(items):
        return sum(1 for item in items if item.path.read_text(errors="replace").strip())

    train, val = inspect_folder(out / "train"), inspect_folder(out / "val")
    held_out = files[:: default_corpus.VAL_EVERY]
    assert val["documents"] == with_text(held_out) >= 1
    assert (
        train["documents"] == with_text([item for item in files if item not in held_out]) > val["documents"]
    )
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

    # A corpus built by an older selection rule (or interrupted before its record) is rebuilt, not reused.
    record = out / default_corpus.CORPUS_FILE
    record.write_text(json.dumps({**json.loads(record.read_text()), "version": 1}))
    assert default_corpus.main(argv) == 0
    assert "already complete" not in capsys.readouterr().out
    assert default_corpus.is_complete(out, max_bytes=200_000)


def test_the_pick_does_not_depend_on_where_python_is_installed(tmp_path):
    """Two installs of the same library under different prefixes give the same corpus."""
    picks = []
    for prefix in ("usr/lib/python3.x", "root/.pyenv/versions/3.x/lib/python3.x"):
        stdlib = tmp_path / prefix
        for i in range(60):
            module = stdlib / f"pkg{i % 7}" / f"module{i}.py"
            module.parent.mkdir(parents=True, exist_ok=True)
            module.write_text(f"x = {i}\n" * (i + 1))
        chosen = default_corpus.select_files(2_000, stdlib=stdlib, licenses=tmp_path / "none")
        picks.append([item.path.relative_to(stdlib) for item in chosen])
    assert picks[0] == picks[1] and 0 < len(picks[0]) < 60
