"""A stream resumed with another global batch size or micro-batch size (both free recipe keys): every chunk of
the epoch is trained once, the batches after the resume have the new recipe's sizes, a batch-size warmup goes
on from the rows really trained, and a masking schedule over rows stays placed by rows. End to end (Composer's
clock, a token-based lr, real checkpoints): test_train_batch_size_change.py."""

import json
import logging
import pickle
import re

import pytest
from test_data_stream import assert_same, batch_pieces, epoch_chunks

from modernbert_train.data import MaskingSchedule, TokenizerInfo, build_dataloader, build_train_dataset
from modernbert_train.data.synthetic import write_synthetic_mds

INFO = TokenizerInfo(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=1000)
WARMUP = {"start": 2, "tokens": 20 * 128 * 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, list]:
    out = tmp_path_factory.mktemp("corpus") / "mds"
    return str(out), write_synthetic_mds(out, 400, seed=5, median=60, size_limit=1 << 14)


def dataset(corpus, global_batch_size: int, micro_batch_size: int = 1, warmup=None, masking=0.3):
    return build_train_dataset(
        [{"local": corpus[0]}], tokenizer=INFO, max_seq_len=128, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, batch_size_warmup=warmup, mlm_probability=masking, seed=3,
        lookahead=48, drop_last=False,
    )  # fmt: skip


def train(data, num_workers: int = 0, stop_after: int | None = None) -> tuple[list, list, dict]:
    """Iterate like Composer (observe each batch) to the end of the epoch or `stop_after` batches: the
    batches, the ratio each was masked at, and the state a checkpoint would hold."""
    batches, ratios, rows = [], [], 0
    for batch in build_dataloader(data, num_workers):
        data.observe(batch)
        batches.append(batch)
        ratios.append(data.last_mlm_probability)
        rows += batch["input_ids"].shape[0]
        if len(batches) == stop_after:
            break
    return batches, ratios, pickle.loads(pickle.dumps(data.state_dict(rows, True)))


def resumed(corpus, before: dict, after: dict, stop_after: int, num_workers: int = 0):
    """`stop_after` batches under `before`, a checkpoint's state, the rest of the epoch under `after`."""
    head, head_ratios, state = train(dataset(corpus, **before), num_workers, stop_after)
    again = dataset(corpus, **after)
    again.load_state_dict(state)
    tail, tail_ratios, _ = train(again, num_workers)
    return head, tail, head_ratios + tail_ratios


def check_every_chunk_once(corpus, batches: list) -> None:
    pieces = sorted(piece for batch in batches for piece in batch_pieces(batch))
    assert pieces == sorted(epoch_chunks(corpus[1], 128))  # none twice, none skipped


def sizes(batches: list) -> list[int]:
    return [int(batch["input_ids"].shape[0]) for batch in batches]


def warmup_rows(rows_trained: int, global_rows: int, increment: int) -> int:
    """The warmup's batch size after `rows_trained` rows (linear in row slots, as BatchSizeSchedule's)."""
    fraction = min(rows_trained * 128 / WARMUP["tokens"], 1.0)
    rounded = int(WARMUP["start"] + (global_rows - WARMUP["start"]) * fraction) // increment * increment
    return min(max(rounded, increment), global_rows)


@pytest.mark.parametrize(
    ("before", "after", "num_workers"),
    [(4, 8, 0), (8, 4, 0), (4, 12, 2)],
    ids=["larger", "smaller", "workers"],
)
def test_another_global_batch_size_trains_every_chunk_once_at_the_new_size(
    corpus, before, after, num_workers
):
    head, tail, _ = resumed(
        corpus, {"global_batch_size": before}, {"global_batch_size": after}, 5, num_workers
    )
    check_every_chunk_once(corpus, head + tail)
    assert sizes(head) == [before] * 5
    assert set(sizes(tail)[: -max(num_workers, 1)]) == {after}  # each producer's last batch may be partial


@pytest.mark.parametrize(
    ("after", "stop_after"),
    [
        ({"global_batch_size": 16, "micro_batch_size": 2}, 12),
        ({"global_batch_size": 16, "micro_batch_size": 2}, 5),
        ({"global_batch_size": 4, "micro_batch_size": 2}, 12),
        ({"global_batch_size": 8, "micro_batch_size": 1}, 12),
        ({"global_batch_size": 8, "micro_batch_size": 4}, 12),
    ],
    ids=["larger", "larger-early", "smaller", "smaller-micro", "larger-micro"],
)
def test_a_batch_size_warmup_goes_on_from_the_rows_trained(corpus, after, stop_after):
    before = {"global_batch_size": 8, "micro_batch_size": 2, "warmup": WARMUP}
    head, tail, _ = resumed(corpus, before, {**after, "warmup": WARMUP}, stop_after)
    check_every_chunk_once(corpus, head + tail)
    rows, expected = sum(sizes(head)), []
    for _ in tail[:-1]:
        expected.append(warmup_rows(rows, after["global_batch_size"], after["micro_batch_size"]))
        rows += expected[-1]
    assert sizes(tail)[:-1] == expected
    assert max(expected) == after["global_batch_size"]  # the warmup ended within the epoch


def test_the_warmup_no_longer_jumps_to_where_the_new_size_would_have_been():
    """Before the data state counted rows, a resume placed the warmup as if every batch so far had had the
    new recipe's size: 28 rows trained at batch 14 (2 each) counted as 62, and the batch jumped to 12."""
    from modernbert_train.data import batch_size_schedule

    def schedule(global_batch_size):
        return batch_size_schedule(
            global_batch_size=global_batch_size, max_seq_len=128, micro_batch_size=2, batch_size_warmup=WARMUP
        )

    trained = schedule(8).rows_before(14)
    assert trained == 28 and schedule(16).rows_before(14) == 62
    placed = schedule(16)
    placed.continue_from(14, trained)
    assert [placed.rows(k) for k in range(14, 20)] == [6, 6, 8, 10, 12, 14]


def test_a_masking_schedule_over_rows_follows_the_rows_trained(corpus):
    masking = MaskingSchedule((0.4, 0.1), (40, 160), "linear", "row")
    head, tail, ratios = resumed(
        corpus, {"global_batch_size": 4, "masking": masking}, {"global_batch_size": 12, "masking": masking}, 6
    )
    rows = 0
    for batch, ratio in zip(head + tail, ratios):
        assert ratio == pytest.approx(masking.rate(rows))
        rows += batch["input_ids"].shape[0]
    assert ratios[0] == 0.4 and ratios[-1] == 0.1 and 0.1 < ratios[8] < 0.4


@pytest.mark.parametrize("saved_before_rows_were_counted", [False, True])
def test_the_same_recipe_resumes_exactly_inside_a_warmup(corpus, saved_before_rows_were_counted):
    """A state without `rows_trained` (an earlier version's) places the warmup by this recipe's sizes."""
    recipe = {"global_batch_size": 8, "micro_batch_size": 2, "warmup": WARMUP}
    straight, _, _ = train(dataset(corpus, **recipe))
    head, _, state = train(dataset(corpus, **recipe), stop_after=14)
    ranks = json.loads(state["ranks"])
    assert ranks[0]["rows_trained"] == sum(sizes(head)) == 28
    if saved_before_rows_were_counted:
        del ranks[0]["rows_trained"]
        state["ranks"] = json.dumps(ranks)
    again = dataset(corpus, **recipe)
    again.load_state_dict(state)
    tail, _, _ = train(again)
    assert_same(head + tail, straight)


def test_another_worker_count_and_batch_size_together_read_no_chunk_twice(corpus, caplog):
    """The producers cannot restart (another topology): the chunks in their lookahead are skipped, as logged,
    and the warmup goes on from the rows trained."""
    before = {"global_batch_size": 8, "micro_batch_size": 2, "warmup": WARMUP}
    head, _, state = train(dataset(corpus, **before), num_workers=2, stop_after=12)
    again = dataset(corpus, **{**before, "global_batch_size": 16})
    again.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="modernbert_train.data.dataset"):
        tail, _, _ = train(again)
    skipped = re.search(
        r"saved by 1 rank\(s\) x 2 producer\(s\): skipped \d+ document\(s\) \((\d+) chunk", caplog.text
    )
    pieces = [piece for batch in head + tail for piece in batch_pieces(batch)]
    assert len(pieces) == len(set(pieces))
    assert len(set(epoch_chunks(corpus[1], 128)) - set(pieces)) == int(skipped[1]) > 0
    rows, expected = sum(sizes(head)), []
    for _ in tail[:-1]:
        expected.append(warmup_rows(rows, 16, 2))
        rows += expected[-1]
    assert sizes(tail)[:-1] == expected
