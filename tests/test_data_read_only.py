"""A dataset on a read-only mount trains: streaming would decompress shards next to themselves, so such a
folder is read through a cache folder instead (and the run says so)."""

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from modernbert_train.data import TokenizerInfo, build_dataloader, build_eval_dataset, build_train_dataset
from modernbert_train.data.synthetic import write_synthetic_mds

INFO = TokenizerInfo(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=1000)


@pytest.fixture
def read_only_corpus(tmp_path):
    """Compressed MDS shards behind a read-only bind mount (mounting needs root; skipped otherwise)."""
    source, mount = tmp_path / "source", tmp_path / "mount"
    write_synthetic_mds(source, 200, seed=2, median=60, size_limit=1 << 13)
    mount.mkdir()
    done = subprocess.run(["mount", "--bind", str(source), str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True, capture_output=True)
        yield source, mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def batches(dataset, num_workers=0) -> list:
    return [batch["input_ids"] for batch in build_dataloader(dataset, num_workers)]


def test_a_read_only_dataset_is_read_through_a_cache(read_only_corpus, tmp_path, caplog):
    source, mount = read_only_corpus
    with pytest.raises(OSError):
        (mount / "probe").write_text("")  # the mount really is read-only
    copy = tmp_path / "writable"
    shutil.copytree(source, copy)

    def train(folder):
        return build_train_dataset(
            [{"local": str(folder)}], tokenizer=INFO, max_seq_len=128, global_batch_size=4, seed=1
        )

    with caplog.at_level(logging.WARNING, logger="modernbert_train.data.mixture"):
        from_mount = batches(train(mount), num_workers=2)
    cache = Path(caplog.text.split(f"{mount} is read-only; its shards are decompressed into ")[1].split()[0])
    assert cache.parent == Path(tempfile.gettempdir()) / "modernbert-streams" and any(cache.glob("*.mds"))
    expected = batches(train(copy), num_workers=2)
    assert len(from_mount) == len(expected) > 10
    assert all((a == b).all() for a, b in zip(from_mount, expected))  # the same stream as a writable copy
    evaluation = build_eval_dataset(
        [{"local": str(mount)}], tokenizer=INFO, max_seq_len=128, global_batch_size=4
    )
    assert len(batches(evaluation)) > 10
    assert sorted(p.name for p in mount.iterdir()) == sorted(p.name for p in source.iterdir())
    shutil.rmtree(cache)
