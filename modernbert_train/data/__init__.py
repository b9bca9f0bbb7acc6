"""Data pipeline: MDS mixture -> chunking -> MLM masking -> best-fit packing -> resumable batches."""

from modernbert_train.data.batch_schedule import BatchSizeSchedule
from modernbert_train.data.dataset import STATE_FORMAT, PackedMLMDataset, batch_num_rows, batch_num_tokens
from modernbert_train.data.loader import (
    PackedLoader,
    build_dataloader,
    build_eval_dataset,
    build_train_dataset,
)
from modernbert_train.data.masking import IGNORE_INDEX
from modernbert_train.data.tokens import TokenizerInfo

__all__ = [
    "IGNORE_INDEX",
    "STATE_FORMAT",
    "BatchSizeSchedule",
    "PackedLoader",
    "PackedMLMDataset",
    "TokenizerInfo",
    "batch_num_rows",
    "batch_num_tokens",
    "build_dataloader",
    "build_eval_dataset",
    "build_train_dataset",
]
