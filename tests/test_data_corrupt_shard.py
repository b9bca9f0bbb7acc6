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


def test_a_corrupt_shard_is_named_with_its_stream(tiny_data, tmp_path):
    copy = shutil.copytree(tiny_data / "train", tmp_path / "train")
    (copy / "shard.00000.mds").unlink(missing_ok=True)  # read from the compressed shard
    compressed = copy / "shard.00000.mds.zstd"
    data = bytearray(compressed.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 512] = bytes(512)
    compressed.write_bytes(bytes(data))

    with pytest.raises(Exception) as error:  # noqa: B017 - torch re-raises in the worker's error type
        next(iter(DataLoader(Documents(str(copy)), num_workers=1)))
    named = (
        f"shard shard.00000.mds.zstd of stream {copy} cannot be read: Decompression error: Data corruption"
    )
    assert _one_line(error.value) == f"modernbert_train.data.mixture.ShardReadError: {named} detected"
