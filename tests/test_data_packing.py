"""Chunking, best-fit packing and the batch layout: every token lands once, boundaries are right."""

import numpy as np
import pytest

from modernbert_train.data import (
    IGNORE_INDEX,
    BatchSizeSchedule,
    TokenizerInfo,
    build_dataloader,
    build_eval_dataset,
)
from modernbert_train.data.chunking import chunk_bounds
from modernbert_train.data.packing import BestFitPacker, Chunk, rows_to_batch
from modernbert_train.data.synthetic import document_lengths, write_synthetic_mds

INFO = TokenizerInfo(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=1000)


@pytest.mark.parametrize("num_tokens", [1, 5, 6, 7, 12, 13, 100])
def test_chunking_conserves_every_token(num_tokens):
    bounds = chunk_bounds(num_tokens, max_seq_len=8)
    covered = np.concatenate([np.arange(start, end) for start, end in bounds])
    assert np.array_equal(covered, np.arange(num_tokens))
    assert all(0 < end - start <= 6 for start, end in bounds)
    assert all(end - start == 6 for start, end in bounds[:-1])


def test_best_fit_packing_is_over_99_percent_full_on_a_realistic_mix():
    max_seq_len = 1024
    lengths = document_lengths(20_000, np.random.default_rng(0))
    packer = BestFitPacker(max_seq_len, lookahead=1000)
    starts = np.random.default_rng(1)  # rows start with a random buffered chunk, as in training
    rows = []
    for doc, length in enumerate(lengths):
        for i, (start, end) in enumerate(chunk_bounds(int(length), max_seq_len)):
            packer.add(Chunk((doc, i), np.zeros(end - start + 2, np.int64)))
            if packer.full:
                rows.append(packer.next_row(starts))
    steady = packer.efficiency
    while len(packer):
        rows.append(packer.next_row(starts))
    assert steady >= 0.99, steady
    assert all(sum(len(c.input_ids) for c in row) <= max_seq_len for row in rows)
    packed_keys = sorted(c.key for row in rows for c in row)
    assert (
        len(packed_keys)
        == len(set(packed_keys))
        == sum(len(chunk_bounds(int(n), max_seq_len)) for n in lengths)
    )


def test_random_row_starts_mix_the_buffer_and_replay_from_the_same_generator():
    """Chunks arrive one document at a time; oldest-first starts made each row the next piece of the same
    document, a random start samples the whole buffer (and the same generator draws the same rows)."""

    def rows_of(starts):
        packer = BestFitPacker(8, lookahead=64)
        for doc in range(8):  # 8 documents of 16 full-row pieces each, arriving whole
            for i in range(16):
                packer.add(Chunk((doc, i), np.zeros(8, np.int64)))
        return [packer.next_row(starts)[0].key for _ in range(16)]

    oldest_first = rows_of(None)
    assert {doc for doc, _ in oldest_first} == {0}
    mixed = rows_of(np.random.default_rng(5))
    assert len({doc for doc, _ in mixed}) >= 6
    assert mixed == rows_of(np.random.default_rng(5)) != rows_of(np.random.default_rng(6))


def test_rows_to_batch_layout():
    rows = [
        [Chunk((0, 0), np.array([1, 7, 8, 2]))],
        [Chunk((1, 0), np.array([1, 9, 2])), Chunk((2, 0), np.array([1, 2]))],
    ]
    batch = rows_to_batch(rows, max_seq_len=6, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 7, 8, 2, 0, 0], [1, 9, 2, 1, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert (batch["labels"] == IGNORE_INDEX).all()  # no mask given: nothing labelled

    def mask_sevens(chunk):
        ids = chunk.input_ids
        return np.where(ids == 7, 3, ids), np.where(ids == 7, 7, -100)

    masked = rows_to_batch(rows, 6, 0, mask=mask_sevens)
    assert masked["input_ids"].tolist()[0] == [1, 3, 8, 2, 0, 0]
    assert masked["labels"].tolist()[0] == [-100, 7, -100, -100, -100, -100]
    assert batch["seq_lens"].tolist() == [[4, 0], [3, 2]]
    assert {k: str(v.dtype) for k, v in batch.items()} == {
        "input_ids": "torch.int64",
        "attention_mask": "torch.int64",
        "labels": "torch.int64",
        "seq_lens": "torch.int32",
    }


def segments(batch) -> list[tuple[int, ...]]:
    """Split each row at its seq_lens and undo the masking: the original chunk bodies."""
    out = []
    for ids, labels, lens in zip(
        batch["input_ids"].numpy(), batch["labels"].numpy(), batch["seq_lens"].numpy()
    ):
        original = np.where(labels != IGNORE_INDEX, labels, ids)
        start = 0
        for n in lens[lens > 0]:
            piece = original[start : start + n]
            assert piece[0] == INFO.cls_id and piece[-1] == INFO.sep_id
            assert (labels[start] == IGNORE_INDEX) and (labels[start + n - 1] == IGNORE_INDEX)
            out.append(tuple(piece[1:-1].tolist()))
            start += n
        assert (ids[start:] == INFO.pad_id).all() and (labels[start:] == IGNORE_INDEX).all()
    return out


def test_packed_rows_reconstruct_the_source_documents(tmp_path):
    max_seq_len = 128
    docs = write_synthetic_mds(tmp_path / "mds", 300, seed=3, median=60)
    expected = sorted(tuple(d[s:e].tolist()) for d in docs for s, e in chunk_bounds(len(d), max_seq_len))
    dataset = build_eval_dataset(
        [{"local": str(tmp_path / "mds")}],
        tokenizer=INFO,
        max_seq_len=max_seq_len,
        global_batch_size=4,
        lookahead=64,
    )
    got, real, slots = [], 0, 0
    for batch in build_dataloader(dataset):
        assert batch["attention_mask"].sum() == batch["seq_lens"].sum()
        got += segments(batch)
        real += int(batch["attention_mask"].sum())
        slots += batch["input_ids"].numel()
    assert sorted(got) == expected
    assert real / slots > 0.95


def test_batch_size_warmup_schedule():
    schedule = BatchSizeSchedule(
        global_rows=64, max_seq_len=100, micro_batch_size=2, world_size=4, start_rows=8, warmup_tokens=20_000
    )
    sizes = [schedule.rows(i) for i in range(40)]
    assert sizes[0] == 8
    assert all(s % 8 == 0 for s in sizes) and sizes == sorted(sizes)
    # linear in row slots seen: the size at each step follows the slots before it
    seen = 0
    for size in sizes:
        assert size == min(max(int(8 + 56 * min(seen / 20_000, 1)) // 8 * 8, 8), 64)
        seen += size * 100
    assert sizes[-1] == 64 and schedule.rows(10_000) == 64
    assert schedule.rank_rows(0) == 2
    assert BatchSizeSchedule(global_rows=64, max_seq_len=100).rows(0) == 64
    fresh = BatchSizeSchedule(
        global_rows=64, max_seq_len=100, micro_batch_size=2, world_size=4, start_rows=8, warmup_tokens=20_000
    )
    assert fresh.rows(25) == sizes[25]  # no dependence on the order of queries


def test_batch_schedule_counts_rows_and_continues_from_the_rows_trained():
    def schedule():
        return BatchSizeSchedule(
            global_rows=64,
            max_seq_len=100,
            micro_batch_size=2,
            world_size=4,
            start_rows=8,
            warmup_tokens=20_000,
        )

    sizes = [schedule().rows(i) for i in range(60)]
    before = [sum(sizes[:i]) for i in range(60)]
    assert [schedule().rows_before(i) for i in range(60)] == before
    for rows in (0, 1, 8, 9, 100, before[30], before[30] + 1, before[59]):
        k = schedule().batches_until(rows)
        assert before[k] >= rows and (k == 0 or before[k - 1] < rows), rows
    # placed at the rows the straight run trained, the sizes are the straight run's
    placed = schedule()
    placed.continue_from(7, before[7])
    assert [placed.rows(i) for i in range(7, 60)] == sizes[7:]
    assert placed.rows_before(59) == before[59] and placed.batches_until(before[40]) == 40
    # placed at fewer rows (the earlier batches were smaller), the warmup goes on from there
    placed.continue_from(20, 80)
    assert placed.rows(20) == 8 + int(56 * 80 * 100 / 20_000) // 8 * 8 == 24 < sizes[20]
    with pytest.raises(ValueError, match="batch 19 is before batch 20, where it continues"):
        placed.rows(19)
    flat = BatchSizeSchedule(global_rows=16, max_seq_len=8)
    flat.continue_from(10, 100)
    assert (flat.rows(10), flat.rows_before(12), flat.batches_until(130)) == (16, 132, 12)


def test_batch_schedule_rejects_bad_sizes():
    with pytest.raises(ValueError, match="global_batch_size=10 must be a positive multiple of world_size=4"):
        BatchSizeSchedule(global_rows=10, max_seq_len=8, world_size=4)
    with pytest.raises(ValueError, match="batch_size_warmup start=99"):
        BatchSizeSchedule(global_rows=8, max_seq_len=8, start_rows=99, warmup_tokens=10)
    # It would start at one micro-batch per rank (8 rows), silently: 64 GPUs x 16 rows took start 768 to 1024.
    below = BatchSizeSchedule(global_rows=16, max_seq_len=8, micro_batch_size=4, world_size=2, start_rows=2,
                              warmup_tokens=64)  # fmt: skip
    assert below.start_below_a_micro_batch().startswith(
        "batch_size_warmup start=2 is below one micro-batch on every rank (2 rank(s) x 4 rows = 8)"
    )
    assert below.rows(0) == 8
    assert BatchSizeSchedule(global_rows=16, max_seq_len=8, micro_batch_size=4, world_size=2, start_rows=8,
                             warmup_tokens=64).start_below_a_micro_batch() is None  # fmt: skip
