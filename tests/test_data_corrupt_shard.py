"""A damaged shard found while training is one line naming the shard and its stream, also when it is read
in a DataLoader worker (whose error torch re-raises with the worker's traceback in the message), from a
bucket or a read-only folder (both fetched into a cache, in the background too), and to every reader of it."""

import shutil
from pathlib import Path

import pytest
from test_data_read_only import read_only_corpus  # noqa: F401 - a fixture
from torch.utils.data import DataLoader, Dataset

from modernbert_train import storage
from modernbert_train.data import TokenizerInfo, build_dataloader, build_train_dataset
from modernbert_train.data.mixture import ShardReadError, build_sample_space, read_sample
from modernbert_train.data.synthetic import write_synthetic_mds
from modernbert_train.train.main import _one_line

INFO = TokenizerInfo(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=1000)


class Documents(Dataset):
    def __init__(self, folder: str):
        self.samples = build_sample_space([{"local": folder}], shuffle=False, seed=0)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        return read_sample(self.samples, index)["input_ids"]


def _damage(compressed: Path) -> None:
    data = bytearray(compressed.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 512] = bytes(512)
    compressed.write_bytes(bytes(data))


def _damaged_copy(tiny_data, tmp_path):
    copy = shutil.copytree(tiny_data / "train", tmp_path / "train")
    _damage(copy / "shard.00000.mds.zstd")
    return copy


def _middle_shard(folder: Path) -> Path:
    """The middle one of the compressed shards in `folder`: a run reads good shards before it."""
    shards = sorted(folder.glob("shard.*.mds.zstd"))
    assert len(shards) >= 3
    return shards[len(shards) // 2]


@pytest.mark.timeout(120)  # the prefetching thread failed silently and the reader waited for it forever
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("harm", ["damaged", "deleted"])
def test_a_bad_shard_in_a_bucket_is_named_mid_run(s3_bucket, tmp_path, capfd, harm, num_workers):
    source = tmp_path / "source"
    write_synthetic_mds(source, 200, seed=2, median=60, size_limit=1 << 13)
    bad = _middle_shard(source)
    if harm == "damaged":
        _damage(bad)
    remote = storage.join(s3_bucket, "train")
    storage.upload_folder(source, remote)
    dataset = build_train_dataset(
        [{"remote": remote, "local": str(tmp_path / "cache")}],
        tokenizer=INFO,
        max_seq_len=128,
        global_batch_size=4,
        seed=1,
    )
    if harm == "deleted":
        storage.remove(storage.join(remote, bad.name))  # after the run read the index

    with pytest.raises(Exception) as error:  # noqa: B017 - torch re-raises in the worker's error type
        for _ in build_dataloader(dataset, num_workers):
            pass
    reason = {
        "damaged": "Decompression error: Data corruption detected",
        "deleted": f"Object {storage.join(remote, bad.name)} not found",
    }[harm]
    named = f"ShardReadError: shard {bad.name} of stream {remote} cannot be read: {reason}"
    assert named in _one_line(error.value) and "\n" not in _one_line(error.value)
    assert "Traceback" not in capfd.readouterr().err  # nothing from the prefetching thread


@pytest.mark.timeout(120)  # the second reader waited forever for the first's failed decompression
def test_a_damaged_shard_on_a_read_only_mount_is_named_to_every_reader(read_only_corpus):  # noqa: F811
    source, mount = read_only_corpus
    bad = _middle_shard(source)
    _damage(bad)
    samples = build_sample_space([{"local": str(mount)}], shuffle=False, seed=0)
    first_sample = int(samples.samples_per_shard[: int(bad.name.split(".")[1])].sum())
    named = (
        f"shard {bad.name} of stream {mount} cannot be read: Decompression error: Data corruption detected"
    )
    try:
        for _ in range(2):  # as another worker or rank, or the next iteration, reads the same shard
            with pytest.raises(ShardReadError) as error:
                read_sample(samples, first_sample)
            assert str(error.value) == named
    finally:
        shutil.rmtree(samples.streams[0].local)


def test_a_corrupt_shard_is_named_with_its_stream(tiny_data, tmp_path):
    copy = _damaged_copy(tiny_data, tmp_path)
    (copy / "shard.00000.mds").unlink(missing_ok=True)  # read from the compressed shard

    with pytest.raises(Exception) as error:  # noqa: B017 - torch re-raises in the worker's error type
        next(iter(DataLoader(Documents(str(copy)), num_workers=1)))
    named = (
        f"shard shard.00000.mds.zstd of stream {copy} cannot be read: Decompression error: Data corruption"
    )
    assert _one_line(error.value) == f"modernbert_train.data.mixture.ShardReadError: {named} detected"


def test_inspect_names_a_damaged_missing_or_short_shard(tiny_data, tmp_path, capsys):
    """`modernbert-data inspect` reads shards itself (in memory, the folder untouched): a damaged, missing or
    truncated shard, or an index that is not JSON, is exit 2 and one line naming the shard or index."""
    from data_prep.cli import main

    def inspect(folder) -> tuple[int, str]:
        code = main(["inspect", str(folder)])
        captured = capsys.readouterr()
        return code, captured.err.strip()

    assert inspect(tiny_data / "train")[0] == 0
    capsys.readouterr()
    copy = _damaged_copy(tiny_data, tmp_path)
    (copy / "shard.00000.mds").unlink(missing_ok=True)  # inspect reads the compressed shard anyway
    code, err = inspect(copy)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"inspect {copy}: shard shard.00000.mds.zstd cannot be read: " in err and "corruption" in err

    short = shutil.copytree(tiny_data / "train", tmp_path / "short")
    compressed = short / "shard.00000.mds.zstd"
    compressed.write_bytes(compressed.read_bytes()[:100])
    code, err = inspect(short)
    assert code == 2 and len(err.splitlines()) == 1 and "shard shard.00000.mds.zstd cannot be read" in err

    missing = shutil.copytree(tiny_data / "train", tmp_path / "missing")
    compressed = missing / "shard.00000.mds.zstd"
    compressed.unlink()
    code, err = inspect(missing)
    assert code == 2 and err.endswith("shard shard.00000.mds.zstd is missing (listed in index.json)"), err

    (missing / "index.json").write_text('{"shards": [')
    code, err = inspect(missing)
    assert code == 2 and len(err.splitlines()) == 1 and "index.json: not an MDS index" in err, err


@pytest.mark.timeout(120)
def test_a_damaged_shard_is_not_kept_in_the_cache_so_a_fixed_upload_reads(s3_bucket, tmp_path):
    source = tmp_path / "source"
    write_synthetic_mds(source, 200, seed=2, median=60, size_limit=1 << 13)
    bad = _middle_shard(source)
    good = bad.read_bytes()
    _damage(bad)
    remote = storage.join(s3_bucket, "train")
    storage.upload_folder(source, remote)
    cache = tmp_path / "cache"
    samples = build_sample_space([{"remote": remote, "local": str(cache)}], shuffle=False, seed=0)
    first_sample = int(samples.samples_per_shard[: int(bad.name.split(".")[1])].sum())
    with pytest.raises(ShardReadError, match="Decompression error"):
        read_sample(samples, first_sample)
    assert not (cache / bad.name).exists() and not (cache / bad.name.removesuffix(".zstd")).exists()

    bad.write_bytes(good)  # the dataset's owner uploads the shard again
    storage.upload_file(bad, storage.join(remote, bad.name))
    assert read_sample(samples, first_sample)["input_ids"].size > 0  # fetched again, not the cached copy
