"""Greedy best-fit packing of chunks into rows of exactly max_seq_len slots, and rows into batches.

The packer holds a look-ahead buffer of chunks. When the buffer is full a row is built: it starts
with a buffered chunk drawn uniformly at random (or the oldest, without a generator) and is then
filled, again and again, with the longest buffered chunk that still fits (the oldest among equals).
With a buffer of a few hundred chunks the small ones fill the gaps the long ones leave, so rows come
out more than 99% full.

Why a random start: documents arrive whole, so a buffer filled in order holds long runs of one
document's consecutive pieces. Starting every row with the oldest piece made a batch of consecutive
pieces of one or two documents (a 170k-token file filled ~40 batches in a row at 128 tokens), which
held the embedded default at the unigram plateau. A random start makes each batch a sample of the
whole buffer; a chunk still waits about `lookahead` rows on average, and the generator is the
caller's, so a resumed run draws the same starts.
"""

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modernbert_train.data.masking import IGNORE_INDEX

_SEQ_BITS = 40  # arrival numbers live in the low bits of a sort key; lengths in the high bits


@dataclass
class Chunk:
    """One `[CLS] ... [SEP]` piece of a document, unmasked; `key` = (sample id, chunk index) names it for
    resume."""

    key: tuple[int, int]
    input_ids: np.ndarray


class BestFitPacker:
    def __init__(self, max_seq_len: int, lookahead: int):
        if lookahead < 1:
            raise ValueError(f"packing lookahead must be >= 1, got {lookahead}")
        self.max_seq_len = max_seq_len
        self.lookahead = lookahead
        self._chunks: dict[int, Chunk] = {}  # arrival number -> chunk, oldest first
        self._sort_keys: list[int] = []  # length << _SEQ_BITS | (mask - arrival), ascending
        self._arrivals = 0
        self.real_tokens = 0
        self.row_slots = 0

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def full(self) -> bool:
        return len(self._chunks) >= self.lookahead

    def add(self, chunk: Chunk) -> None:
        length = chunk.input_ids.shape[0]
        if length > self.max_seq_len:
            raise ValueError(
                f"chunk {chunk.key} has {length} tokens, more than max_seq_len={self.max_seq_len}"
            )
        arrival = self._arrivals
        self._arrivals += 1
        self._chunks[arrival] = chunk
        bisect.insort(self._sort_keys, self._sort_key(length, arrival))

    def buffered_keys(self) -> list[tuple[int, int]]:
        """The buffered chunks' keys, oldest first: re-adding them in this order restores the packer."""
        return [chunk.key for chunk in self._chunks.values()]

    def next_row(self, rng: np.random.Generator | None = None) -> list[Chunk]:
        """Build one row from the buffer (which must not be empty), starting with a chunk drawn by `rng`
        (the oldest when None)."""
        start = int(rng.integers(len(self._chunks))) if rng is not None else 0
        arrival, first = next(itertools.islice(self._chunks.items(), start, None))
        self._take(arrival, first.input_ids.shape[0])
        row = [first]
        space = self.max_seq_len - first.input_ids.shape[0]
        while space > 0 and self._sort_keys:
            # The largest key at or below (space, oldest) is the longest chunk that fits.
            i = bisect.bisect_right(self._sort_keys, self._sort_key(space, 0)) - 1
            if i < 0:
                break
            key = self._sort_keys[i]
            length = key >> _SEQ_BITS
            arrival = (1 << _SEQ_BITS) - 1 - (key & ((1 << _SEQ_BITS) - 1))
            chunk = self._chunks[arrival]
            self._take(arrival, length)
            row.append(chunk)
            space -= length
        self.real_tokens += self.max_seq_len - space
        self.row_slots += self.max_seq_len
        return row

    @property
    def efficiency(self) -> float:
        """Real tokens / row slots over every row built so far."""
        return self.real_tokens / self.row_slots if self.row_slots else 1.0

    def _take(self, arrival: int, length: int) -> None:
        del self._chunks[arrival]
        i = bisect.bisect_left(self._sort_keys, self._sort_key(length, arrival))
        del self._sort_keys[i]

    @staticmethod
    def _sort_key(length: int, arrival: int) -> int:
        # Older chunks get larger keys among equal lengths, so "largest key <= x" prefers them.
        return (length << _SEQ_BITS) | ((1 << _SEQ_BITS) - 1 - arrival)


def rows_to_batch(
    rows: list[list[Chunk]],
    max_seq_len: int,
    pad_id: int,
    mask: Callable[[Chunk], tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Stack packed rows into the batch layout of docs/internals.md (tensors, [B, S] and [B, K]).

    `mask` maps a chunk to its (input_ids, labels); without it nothing is labelled."""
    num_rows = len(rows)
    most_docs = max(len(row) for row in rows)
    input_ids = np.full((num_rows, max_seq_len), pad_id, dtype=np.int64)
    labels = np.full((num_rows, max_seq_len), IGNORE_INDEX, dtype=np.int64)
    seq_lens = np.zeros((num_rows, most_docs), dtype=np.int32)
    for r, row in enumerate(rows):
        start = 0
        for k, chunk in enumerate(row):
            end = start + chunk.input_ids.shape[0]
            if mask is None:
                input_ids[r, start:end] = chunk.input_ids
            else:
                input_ids[r, start:end], labels[r, start:end] = mask(chunk)
            seq_lens[r, k] = end - start
            start = end
    attention_mask = (np.arange(max_seq_len)[None, :] < seq_lens.sum(axis=1, keepdims=True)).astype(np.int64)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "seq_lens": torch.from_numpy(seq_lens),
    }
