"""A damaged shard found while training is one line naming the shard and its stream, also when it is read
in a DataLoader worker (whose error torch re-raises with the worker's traceback in the message)."""

import shutil

import pytest
from torch.utils.data import DataLoader, Dataset

from modernbert_train.data.mixture import build_sample_space, read_sample
from modernbert_train.train.main import _one_line


class Documents(Dataset):
    def __init__(self, folder: str):
        self.samples = build_sample_space([{"local": folder}], shuffle=False, seed=0)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        return read_sample(self.samples, index)["input_ids"]


def _damaged_copy(tiny_data, tmp_path):
    copy = shutil.copytree(tiny_data / "train", tmp_path / "train")
    compressed = copy / "shard.00000.mds.zstd"
    data = bytearray(compressed.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 512] = bytes(512)
    compressed.write_bytes(bytes(data))
    return copy


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
