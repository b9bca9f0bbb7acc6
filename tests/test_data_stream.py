"""The packed stream end to end: exact resume, epochs, mixture, eval determinism, ranks, bad input."""

import json
import logging
import os
import pickle
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start_ranks, wait_for_ranks
from streaming import MDSWriter

from modernbert_train.data import (
    MaskingSchedule,
    TokenizerInfo,
    build_dataloader,
    build_eval_dataset,
    build_train_dataset,
)
from modernbert_train.data.chunking import chunk_bounds
from modernbert_train.data.synthetic import MDS_COLUMNS, write_synthetic_mds

INFO = TokenizerInfo(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=1000)
KEYS = ("input_ids", "attention_mask", "labels", "seq_lens")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("corpus") / "mds"
    write_synthetic_mds(out, 400, seed=5, median=60, size_limit=1 << 14)
    return str(out)


def train_dataset(corpus: str):
    return build_train_dataset(
        [{"local": corpus}],
        tokenizer=INFO,
        max_seq_len=128,
        global_batch_size=8,
        micro_batch_size=2,
        lookahead=48,
        batch_size_warmup={"start": 2, "tokens": 20 * 128 * 4},
        seed=3,
        # a ramp through the resume points below: a resumed run must mask each batch at its own ratio
        mlm_probability=MaskingSchedule((0.4, 0.1), (4, 16), "linear"),
    )


def run(dataset, loader, epochs: int, stop_after: int | None = None):
    """Iterate like Composer: observe each batch; optionally stop after `stop_after` batches and
    return the state Composer would checkpoint (num_samples = rows trained in this epoch)."""
    batches = []
    for _ in range(epochs):
        rows_in_epoch = 0
        for batch in loader:
            dataset.observe(batch)
            assert "pack_state" not in batch
            batches.append(batch)
            rows_in_epoch += batch["input_ids"].shape[0]
            if len(batches) == stop_after:
                return batches, pickle.loads(pickle.dumps(dataset.state_dict(rows_in_epoch, True)))
    return batches, pickle.loads(pickle.dumps(dataset.state_dict(0, True)))


def assert_same(a: list, b: list):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in KEYS:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_mid_epoch_and_across_the_epoch_boundary(corpus, num_workers):
    dataset = train_dataset(corpus)
    full, _ = run(dataset, build_dataloader(dataset, num_workers), epochs=2)
    sizes = [b["input_ids"].shape[0] for b in full]
    assert sizes[0] == 2 and max(sizes) == 8  # batch-size warmup reached the full batch

    for stop in (7, 12):
        first = train_dataset(corpus)
        head, state = run(first, build_dataloader(first, num_workers), epochs=1, stop_after=stop)
        resumed = train_dataset(corpus)
        resumed.load_state_dict(state)
        loader = build_dataloader(resumed, num_workers)
        tail = [b for b in loader if resumed.observe(b) is None]  # rest of epoch 0
        tail += [b for b in loader if resumed.observe(b) is None]  # epoch 1
        assert_same(head + tail, full)


def test_each_batch_is_masked_at_its_scheduled_ratio_and_observe_records_it(corpus):
    dataset = train_dataset(corpus)
    loader = build_dataloader(dataset)
    labelled, ratios = [], []
    for k, batch in enumerate(loader):
        dataset.observe(batch)
        real = batch["attention_mask"].sum() - 2 * (batch["seq_lens"] > 0).sum()  # without [CLS]/[SEP]
        labelled.append(float((batch["labels"] != -100).sum() / real))
        ratios.append(dataset.last_mlm_probability)
        assert ratios[-1] == pytest.approx(dataset.masking.rate(k))
        if k == 24:
            break
    assert ratios[:5] == [0.4] * 5 and ratios[16:] == [0.1] * 9
    assert ratios[4:17] == sorted(ratios[4:17], reverse=True)
    assert abs(sum(labelled[:4]) / 4 - 0.4) < 0.04 and abs(sum(labelled[16:]) / 9 - 0.1) < 0.02


@pytest.mark.slow
def test_resume_at_epoch_end_starts_the_next_epoch(corpus):
    dataset = train_dataset(corpus)
    loader = build_dataloader(dataset)
    epoch0, state = run(dataset, loader, epochs=1)
    epoch1, _ = run(dataset, loader, epochs=1)
    (rank_state,) = json.loads(state["ranks"])
    assert rank_state["epoch"] == 1 and rank_state["batches_before_epoch"] == len(epoch0)
    resumed = train_dataset(corpus)
    resumed.load_state_dict(state)
    again, _ = run(resumed, build_dataloader(resumed), epochs=1)
    assert_same(again, epoch1)
    # epochs reshuffle and remask: the second epoch is not the first one again
    assert not torch.equal(epoch0[-1]["input_ids"], epoch1[-1]["input_ids"])


def batch_pieces(batch: dict) -> list[tuple[int, ...]]:
    """The unmasked tokens of each chunk in a batch, without [CLS] and [SEP]."""
    tokens = torch.where(batch["labels"] == -100, batch["input_ids"], batch["labels"])
    pieces = []
    for row, lens in zip(tokens.tolist(), batch["seq_lens"].tolist()):
        start = 0
        for n in filter(None, lens):
            pieces.append(tuple(row[start + 1 : start + n - 1]))
            start += n
    return pieces


def epoch_chunks(documents: list, max_seq_len: int) -> list[tuple[int, ...]]:
    return [tuple(doc[a:b].tolist()) for doc in documents for a, b in chunk_bounds(len(doc), max_seq_len)]


@pytest.fixture(scope="module")
def corpus_documents(corpus, tmp_path_factory) -> list:
    """The corpus fixture's documents (the same seed and sizes, written again to learn them)."""
    return write_synthetic_mds(
        tmp_path_factory.mktemp("again") / "mds", 400, seed=5, median=60, size_limit=1 << 14
    )


def check_one_epoch(pieces: list, documents: list, skipped_chunks: int, old_producers: int) -> None:
    """Every chunk of the epoch trained once, but the skipped ones; none twice."""
    assert len(pieces) == len(set(pieces))
    missing = set(epoch_chunks(documents, 128)) - set(pieces)
    assert len(missing) == skipped_chunks
    # at most what the old packers held: a packer reads whole documents until it holds the lookahead (48)
    longest = max(len(chunk_bounds(len(doc), 128)) for doc in documents)
    assert 0 < skipped_chunks <= old_producers * (48 + longest - 1)


def skipped_chunks(log: str) -> int:
    match = re.search(r"skipped (\d+) document\(s\) \((\d+) chunk\(s\)\)", log)
    assert match, log[-2000:]
    return int(match[2])


def whole_epoch_dataset(corpus: str):
    """Batches of 4 rows of 128 tokens, the epoch's last partial batch kept."""
    return build_train_dataset(
        [{"local": corpus}], tokenizer=INFO, max_seq_len=128, global_batch_size=4, seed=3, lookahead=48,
        drop_last=False,
    )  # fmt: skip


def test_resume_on_another_worker_count_reads_no_document_twice(corpus, corpus_documents, caplog):
    first = whole_epoch_dataset(corpus)
    head, state = run(first, build_dataloader(first, num_workers=2), epochs=1, stop_after=5)
    resumed = whole_epoch_dataset(corpus)
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="modernbert_train.data.dataset"):
        tail = [b for b in build_dataloader(resumed) if resumed.observe(b) is None]  # the rest of the epoch
    assert "saved by 1 rank(s) x 2 producer(s)" in caplog.text
    pieces = [piece for batch in head + tail for piece in batch_pieces(batch)]
    check_one_epoch(pieces, corpus_documents, skipped_chunks(caplog.text), old_producers=2)
    assert all(b["input_ids"].shape[0] == 4 for b in tail[:-1])  # the same global batch


@pytest.mark.parametrize("workers", [(2, 0), (0, 3)])
def test_resume_on_another_worker_count_keeps_a_repeated_sources_later_repeats(tmp_path, caplog, workers):
    """A source the mixture repeats has each sample id several times in an epoch; a resume on another
    topology leaves out as many occurrences as were read, not all of them (which dropped most of a small
    upsampled source's epoch, silently: 77 of 164 draws in an audit)."""
    from collections import Counter

    small = write_synthetic_mds(tmp_path / "small", 20, seed=1, median=40, token_range=(5, 500))
    large = write_synthetic_mds(tmp_path / "large", 120, seed=2, median=60, token_range=(500, 1000))
    sources = [{"local": str(tmp_path / "small"), "repeat": 4}, {"local": str(tmp_path / "large")}]

    def dataset():
        return build_train_dataset(
            sources,
            tokenizer=INFO,
            max_seq_len=128,
            global_batch_size=4,
            seed=3,
            lookahead=16,
            drop_last=False,
        )

    before, after = workers
    first = dataset()
    head, state = run(first, build_dataloader(first, num_workers=before), epochs=1, stop_after=12)
    resumed = dataset()
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="modernbert_train.data.dataset"):
        tail = [b for b in build_dataloader(resumed, num_workers=after) if resumed.observe(b) is None]
    trained = Counter(piece for batch in head + tail for piece in batch_pieces(batch))
    expected = Counter(epoch_chunks(small, 128) * 4 + epoch_chunks(large, 128))
    assert not trained - expected  # nothing read more often than the epoch holds it
    missing = expected - trained
    assert sum(missing.values()) == skipped_chunks(caplog.text)  # only the old packers' waiting chunks
    small_chunks = set(epoch_chunks(small, 128))
    assert sum(n for piece, n in trained.items() if piece in small_chunks) > 3 * len(small_chunks)


def test_another_topologys_reads_are_recomputed_once_per_rank_not_in_every_worker(
    corpus, corpus_documents, tmp_path, monkeypatch, caplog
):
    """Each topology's partition is the whole epoch's sample ids (GBs at a billion documents, several
    copies while streaming builds it): the main process works out what the old producers read once, before
    its workers fork, and hands each worker one bit per sample id. Counted through a file the forked
    workers append to: one partition for the old topology and one for this one, whatever the worker count
    (it was 2 in each of 3 workers)."""
    import modernbert_train.data.dataset as dataset_module

    calls = tmp_path / "calls"
    real = dataset_module.generate_work

    def counted(*args, **kwargs):
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "generate_work", counted)

    first = whole_epoch_dataset(corpus)
    head, state = run(first, build_dataloader(first, num_workers=2), epochs=1, stop_after=5)
    assert not calls.exists()  # the plain path: streaming's own partition, shared per node
    resumed = whole_epoch_dataset(corpus)
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="modernbert_train.data.dataset"):
        tail = [b for b in build_dataloader(resumed, num_workers=3) if resumed.observe(b) is None]
    assert calls.read_text().split() == [str(os.getpid())] * 2
    pieces = [piece for batch in head + tail for piece in batch_pieces(batch)]
    check_one_epoch(pieces, corpus_documents, skipped_chunks(caplog.text), old_producers=2)


def test_an_epoch_reads_every_producers_part_however_unevenly_the_tokens_fell(tmp_path):
    """With workers, a producer that has run dry is passed over and the others go on to the end of their
    parts: one long document among short ones (nearly all of the epoch's tokens in one producer's part) is
    read whole, every chunk once. A resume after a producer ran dry replays the epoch's rest and the next."""
    rng = np.random.default_rng(0)
    documents = [rng.integers(5, 1000, 6000).astype(np.uint16)]
    documents += [rng.integers(5, 1000, int(n)).astype(np.uint16) for n in rng.integers(20, 60, 40)]
    with MDSWriter(out=str(tmp_path / "mds"), columns=MDS_COLUMNS, size_limit=1 << 12) as writer:
        for i, tokens in enumerate(documents):
            writer.write({"input_ids": tokens, "doc_id": i, "source": "uneven"})

    def dataset():
        return build_train_dataset(
            [{"local": str(tmp_path / "mds")}], tokenizer=INFO, max_seq_len=128, global_batch_size=4, seed=3,
            lookahead=16, drop_last=False,
        )  # fmt: skip

    first = dataset()
    full, _ = run(first, build_dataloader(first, num_workers=2), epochs=2)
    pieces = [piece for batch in full for piece in batch_pieces(batch)]
    chunks = epoch_chunks(documents, 128)
    assert sorted(pieces) == sorted(chunks + chunks)  # each epoch: every chunk, once
    epoch_batches = len(full) // 2
    assert epoch_batches > 12  # the long document's producer went on alone for most of the epoch

    stop = epoch_batches - 3  # the other producer has long run dry
    head_run = dataset()
    head, state = run(head_run, build_dataloader(head_run, num_workers=2), epochs=1, stop_after=stop)
    (rank_state,) = json.loads(state["ranks"])
    assert rank_state["batches_in_epoch"] == stop and len(rank_state["dry"]) == 1  # resumed in the tail
    resumed = dataset()
    resumed.load_state_dict(state)
    loader = build_dataloader(resumed, num_workers=2)
    tail = [b for b in loader if resumed.observe(b) is None]  # rest of epoch 0
    tail += [b for b in loader if resumed.observe(b) is None]  # epoch 1
    assert_same(head + tail, full)


def test_an_epoch_that_can_make_no_batch_is_an_error_not_an_endless_loop(corpus):
    dataset = build_train_dataset(
        [{"local": corpus}], tokenizer=INFO, max_seq_len=128, global_batch_size=100_000
    )
    with pytest.raises(
        ValueError, match=r"^data: epoch 0 made no batch on rank 0: .* fewer than 100000 rows of 128"
    ):
        list(build_dataloader(dataset))


def test_eval_stream_is_deterministic_and_finite(corpus):
    def eval_batches(num_workers):
        dataset = build_eval_dataset(
            [{"local": corpus}], tokenizer=INFO, max_seq_len=128, global_batch_size=4
        )
        loader = build_dataloader(dataset, num_workers)
        return list(loader), list(loader)

    first, second = eval_batches(0)
    assert_same(first, second)
    assert all("pack_state" not in b for b in first)
    masked = sum(int((b["labels"] != -100).sum()) for b in first)
    real = sum(int(b["attention_mask"].sum()) for b in first)
    specials = 2 * sum(int((b["seq_lens"] > 0).sum()) for b in first)
    assert abs(masked / (real - specials) - 0.15) < 0.02


def test_an_evaluations_parts_hold_each_sample_of_the_epoch_once(tmp_path):
    """Over ranks x producers, every sample of the eval epoch once (a repeated source's twice), in order:
    streaming's own partition would pad the ranks' parts by repeating samples, which a metric counts twice."""
    from modernbert_train.data.mixture import build_sample_space, evaluation_sample_ids

    write_synthetic_mds(tmp_path / "a", 39, seed=1, median=20, token_range=(5, 50))
    write_synthetic_mds(tmp_path / "b", 10, seed=2, median=20, token_range=(5, 50))
    sources = [{"local": str(tmp_path / "a")}, {"local": str(tmp_path / "b"), "repeat": 2}]
    samples = build_sample_space(sources, shuffle=False, seed=17)
    whole = evaluation_sample_ids(samples, 0, 0, 1)
    assert sorted(whole.tolist()) == list(range(39)) + [39 + i for i in range(10) for _ in range(2)]
    for parts in (2, 6, 100):
        ids = np.concatenate([evaluation_sample_ids(samples, 0, part, parts) for part in range(parts)])
        assert ids.tolist() == whole.tolist(), parts


def test_masks_do_not_depend_on_worker_count(corpus):
    """Same (seed, epoch, sample): same masked tokens, whichever worker packs the document."""

    def masked_documents(num_workers):
        dataset = build_eval_dataset(
            [{"local": corpus}], tokenizer=INFO, max_seq_len=128, global_batch_size=4
        )
        pieces = set()
        for batch in build_dataloader(dataset, num_workers):
            for ids, labels, lens in zip(batch["input_ids"], batch["labels"], batch["seq_lens"]):
                for piece in torch.split(
                    torch.stack([ids, labels])[:, : int(lens.sum())], lens[lens > 0].tolist(), 1
                ):
                    pieces.add(tuple(piece.flatten().tolist()))
        return pieces

    assert masked_documents(0) == masked_documents(2)


def test_two_source_mixture_proportions(tmp_path):
    write_synthetic_mds(tmp_path / "a", 300, seed=1, median=20, token_range=(5, 500))
    write_synthetic_mds(tmp_path / "b", 900, seed=2, median=20, token_range=(500, 1000))
    sources = [
        {"name": "a", "local": str(tmp_path / "a"), "proportion": 0.75},
        {"name": "b", "local": str(tmp_path / "b"), "proportion": 0.25},
    ]
    dataset = build_train_dataset(
        sources, tokenizer=INFO, max_seq_len=512, global_batch_size=4, epoch_size=2000, lookahead=64
    )
    from_a = from_b = 0
    for batch in build_dataloader(dataset):
        dataset.observe(batch)
        starts = torch.cumsum(batch["seq_lens"], 1) - batch["seq_lens"] + 1  # first body token of each piece
        original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
        for row, row_starts, lens in zip(original, starts, batch["seq_lens"]):
            first_tokens = row[row_starts[lens > 0]]
            from_b += int((first_tokens >= 500).sum())
            from_a += int(((first_tokens >= 5) & (first_tokens < 500)).sum())
    share_a = from_a / (from_a + from_b)
    assert from_a + from_b > 1800
    assert abs(share_a - 0.75) < 0.03, share_a


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([{"local": "x", "propotion": 1}], "data source 0: unknown key 'propotion'"),
        ([{"name": "web"}], r"data source 0 \(web\): needs 'local' or 'remote'"),
        ([{"local": "x", "proportion": 1, "repeat": 2}], "data source 0: give at most one of"),
        (
            [{"local": "x", "proportion": 1}, {"local": "y", "repeat": 2}],
            "data source 1: 'proportion' cannot be",
        ),
        ([{"local": "x", "proportion": -1}], "data source 0: 'proportion' must be a positive number"),
        ({"local": "x"}, "data sources: expected a non-empty list"),
    ],
)
def test_bad_sources_give_one_line_errors(sources, message):
    with pytest.raises(ValueError, match=message) as error:
        build_train_dataset(sources, tokenizer=INFO, max_seq_len=64, global_batch_size=2)
    assert "\n" not in str(error.value)


def test_a_source_whose_weight_draws_no_document_is_refused(tmp_path):
    """streaming rounds each source's draws down and hands the remainder out once, by seed: a tiny
    proportion drew nothing in every epoch, silently."""
    write_synthetic_mds(tmp_path / "a", 50, seed=1, median=20)
    write_synthetic_mds(tmp_path / "b", 50, seed=2, median=20)
    sources = [
        {"local": str(tmp_path / "a"), "proportion": 1},
        {"name": "rare", "local": str(tmp_path / "b")},
    ]
    sources[1]["proportion"] = 1e-5
    with pytest.raises(ValueError) as error:
        build_train_dataset(sources, tokenizer=INFO, max_seq_len=64, global_batch_size=2, seed=1)
    assert str(error.value) == (
        "data source 1 (rare): its proportion 1e-05 draws none of its 50 documents in any epoch (of 100 "
        "drawn); raise it, or leave the source out"
    )
    sources[1] = {"local": str(tmp_path / "b"), "repeat": 0.001}
    with pytest.raises(ValueError, match="data source 0: its repeat 0.001 draws none of its 50 documents"):
        build_train_dataset(sources[1:], tokenizer=INFO, max_seq_len=64, global_batch_size=2, seed=1)


def test_bad_batch_size_warmup_is_named(corpus):
    with pytest.raises(ValueError, match="batch_size_warmup: expected"):
        build_train_dataset(
            [{"local": corpus}],
            tokenizer=INFO,
            max_seq_len=64,
            global_batch_size=2,
            batch_size_warmup={"start": 1},
        )


RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from modernbert_train.data import TokenizerInfo, build_dataloader, build_eval_dataset, build_train_dataset

    corpus, out = sys.argv[1], sys.argv[2].format(os.environ["RANK"])
    dist.init_process_group("gloo")
    info = TokenizerInfo(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=1000)
    evaluation = build_eval_dataset([{"local": corpus}], tokenizer=info, max_seq_len=128, global_batch_size=4)
    firsts = []
    for batch in build_dataloader(evaluation):
        starts = (batch["seq_lens"].cumsum(1) - batch["seq_lens"]).tolist()
        for row, row_starts, lens in zip(batch["input_ids"].tolist(), starts, batch["seq_lens"].tolist()):
            firsts += [row[s : s + n] for s, n in zip(row_starts, lens) if n]
    train = build_train_dataset([{"local": corpus}], tokenizer=info, max_seq_len=128, global_batch_size=4)
    batch = next(iter(build_dataloader(train)))
    train.observe(batch)
    state = train.state_dict(batch["input_ids"].shape[0], True)
    ranks = [r["producers"]["0"]["rank"] for r in json.loads(state["ranks"])]
    json.dump({"pieces": firsts, "ranks": ranks}, open(out, "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_ranks_see_disjoint_data_and_gather_state(corpus, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    command = [sys.executable, str(script), corpus, str(tmp_path / "rank{}.json")]
    wait_for_ranks(start_ranks(command, 2, TMPDIR=str(tmp_path)), timeout=120)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["ranks"] for r in results] == [[0, 1], [0, 1]]  # each rank's state gathered everywhere
    pieces = [{tuple(p) for p in r["pieces"]} for r in results]
    total = len(pieces[0]) + len(pieces[1])
    assert total > 400 and len(pieces[0] & pieces[1]) <= 2  # streaming pads the split with <= world repeats


RESHAPE_SCRIPT = textwrap.dedent(
    """
    import json, os, pickle, sys
    import torch.distributed as dist
    from modernbert_train.data import TokenizerInfo, build_dataloader, build_train_dataset

    corpus, state_in, take, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("gloo")
    info = TokenizerInfo(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=1000)
    dataset = build_train_dataset(
        [{"local": corpus}], tokenizer=info, max_seq_len=128, global_batch_size=4, seed=3, lookahead=48,
        drop_last=False,
    )
    if state_in != "-":
        dataset.load_state_dict(pickle.load(open(state_in, "rb")))
    batches, rows = [], 0
    for batch in build_dataloader(dataset):
        dataset.observe(batch)
        rows += batch["input_ids"].shape[0]
        batches.append({key: batch[key].tolist() for key in ("input_ids", "labels", "seq_lens")})
        if len(batches) == take:
            break
    state = dataset.state_dict(rows, True)  # every rank calls it: it gathers
    if take > 0 and int(os.environ["RANK"]) == 0:
        pickle.dump(state, open(out + ".state", "wb"))
    json.dump(batches, open(out + "-rank" + os.environ["RANK"] + ".json", "w"))
    """
)


def run_ranks(script: Path, world_size: int, *args: str) -> str:
    """`script ARGS` as `world_size` gloo ranks; their stderr, joined."""
    processes = start_ranks([sys.executable, str(script), *args], world_size, TMPDIR=str(script.parent))
    return "\n".join(wait_for_ranks(processes, timeout=180))


def trained_pieces(out: Path, world_size: int) -> list:
    pieces = []
    for rank in range(world_size):
        for batch in json.loads(Path(f"{out}-rank{rank}.json").read_text()):
            pieces += batch_pieces({key: torch.tensor(value) for key, value in batch.items()})
    return pieces


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size_reads_no_document_twice(
    corpus, corpus_documents, tmp_path, before, after
):
    """5 batches on `before` ranks, the rest of the epoch on `after`: each chunk once, but the skipped."""
    script = tmp_path / "rank.py"
    script.write_text(RESHAPE_SCRIPT)
    first, rest = tmp_path / "first", tmp_path / "rest"
    run_ranks(script, before, corpus, "-", "5", str(first))
    log = run_ranks(script, after, corpus, f"{first}.state", "-1", str(rest))
    assert f"resuming on {after} rank(s) a stream saved by {before} rank(s) x 1 producer(s)" in log
    pieces = trained_pieces(first, before) + trained_pieces(rest, after)
    check_one_epoch(pieces, corpus_documents, skipped_chunks(log), old_producers=before)


def test_a_shared_memory_prefix_taken_in_a_race_is_looked_up_again(corpus, monkeypatch):
    """Two jobs starting together can pick the same free prefix; the later one must pick again."""
    from multiprocessing.shared_memory import SharedMemory

    from streaming.base.shared import prefix

    find = prefix._check_and_find_retrying
    rival = {}

    def find_then_lose_the_race(*args, **kwargs):
        found = find(*args, **kwargs)
        if not rival:  # another job registers the same prefix between our look and our create
            rival["shm"] = SharedMemory(prefix._get_path(found, prefix.LOCALS), True, 8)
        return found

    monkeypatch.setattr(prefix, "_check_and_find_retrying", find_then_lose_the_race)
    try:
        dataset = train_dataset(corpus)
        assert next(iter(build_dataloader(dataset)))["input_ids"].shape[1] > 0
    finally:
        rival["shm"].close()
        rival["shm"].unlink()
