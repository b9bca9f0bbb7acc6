"""Data pipeline: MDS mixture -> chunking -> best-fit packing -> MLM masking -> resumable batches."""

from modernbert_train.data.batch_schedule import BatchSizeSchedule
from modernbert_train.data.dataset import STATE_FORMAT, PackedMLMDataset, batch_num_rows, batch_num_tokens
from modernbert_train.data.loader import (
    PackedLoader,
    batch_size_schedule,
    build_dataloader,
    build_eval_dataset,
    build_train_dataset,
)
from modernbert_train.data.masking import IGNORE_INDEX, MaskingSchedule
from modernbert_train.data.tokens import TokenizerInfo

__all__ = [
    "IGNORE_INDEX",
    "STATE_FORMAT",
    "BatchSizeSchedule",
    "MaskingSchedule",
    "PackedLoader",
    "PackedMLMDataset",
    "TokenizerInfo",
    "batch_num_rows",
    "batch_num_tokens",
    "batch_size_schedule",
    "build_dataloader",
    "build_eval_dataset",
    "build_train_dataset",
]
