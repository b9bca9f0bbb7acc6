"""Builders: sources + token ids -> PackedMLMDataset -> DataLoader of whole batches.

Typical use (the Composer glue):

    dataset = build_train_dataset(sources, tokenizer=TokenizerInfo(...), max_seq_len=1024,
                                  global_batch_size=4608, micro_batch_size=96)
    loader = build_dataloader(dataset, num_workers=4)
    for batch in loader:            # Composer iterates; one batch per optimizer step
        dataset.observe(batch)      # AFTER_DATALOADER callback: pops batch["pack_state"]
    dataset.state_dict(n, True) / dataset.load_state_dict(obj)   # Composer checkpoints

Side channel: `pack_state` rides in the batch from the worker that made it to `observe`, which
runs only for batches the trainer really trains on (Composer drops a fetched batch when another
rank ran out), so the recorded state is exactly the trained stream.
"""

from collections.abc import Iterator, Sequence
from typing import Any

from streaming.base.world import World
from torch.utils.data import DataLoader

from modernbert_train.data.batch_schedule import BatchSizeSchedule
from modernbert_train.data.dataset import PackedMLMDataset
from modernbert_train.data.masking import MaskingSchedule
from modernbert_train.data.mixture import build_sample_space
from modernbert_train.data.ranks import any_rank
from modernbert_train.data.tokens import TokenizerInfo


class PackedLoader(DataLoader):
    """A DataLoader (Composer finds `.dataset` through it) that plans each iteration in the main
    process before its workers fork, and checks that training batches come in turn over the producers.

    In turn: from producer `next_producer` (the plan's) on, cyclically. torch's DataLoader returns its
    workers' batches in that order and passes over a worker whose iterator has ended, so a producer that
    has run dry is skipped and the others go on until every one has: the epoch reads each producer's
    whole part, however unevenly the documents' tokens fell to them. The order depends only on how many
    batches each producer makes, so a resume replays it."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset: PackedMLMDataset = self.dataset
        num_producers = max(self.num_workers, 1)
        plan = dataset.begin_iteration(num_producers)
        due, dry = plan["next_producer"], set()
        if not dataset.resumable:
            yield from _until_every_rank_is_done(super().__iter__(), dataset)
            return
        made = 0
        for batch in super().__iter__():
            made += 1
            producer = batch["pack_state"]["producer"]
            while producer != due:  # the DataLoader passed over `due`: it has run dry
                dry.add(due)
                dataset.ran_dry(due)
                due = (due + 1) % num_producers
                if len(dry) == num_producers:
                    raise RuntimeError(f"data: producer {producer} made a batch after it had run dry")
            due = (due + 1) % num_producers
            yield batch
        if not made and not plan["batches_in_epoch"] and not plan["producers"]:
            # Composer would begin the next epoch, and the next, forever (every rank stops at the first out).
            rows = dataset.schedule.rank_rows(plan["batches_before_epoch"])
            raise ValueError(
                f"data: epoch {plan['epoch']} made no batch on rank {dataset.rank}: its part of the train "
                f"split packs into fewer than {rows} rows of {dataset.max_seq_len} tokens (lower "
                "global_train_batch_size or data.max_seq_len, or add data)"
            )


def _until_every_rank_is_done(batches: Iterator[dict[str, Any]], dataset: PackedMLMDataset):
    """An evaluation's batches, then unlabelled ones until every rank's part is done: ranks make different
    numbers of batches from their parts, and Composer's loop stops every rank at the first one out, which
    would leave the other ranks' last batches unscored. One flag agreed over the ranks per batch."""
    done = False
    while True:
        batch = None if done else next(batches, None)
        done = batch is None
        if not any_rank(not done):
            return
        if done:
            yield dataset.unlabelled_batch()
            continue
        batch.pop("pack_state")
        yield batch


def build_dataloader(
    dataset: PackedMLMDataset, num_workers: int = 0, *, prefetch_factor: int = 2, pin_memory: bool = False
) -> PackedLoader:
    """A loader of whole batches (batch_size=None). Workers are not persistent: each iteration
    forks them afresh so they inherit the plan (epoch, resume state) made in the main process."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return PackedLoader(
        dataset,
        batch_size=None,
        collate_fn=_as_is,  # batches are built whole; the default would walk every pack_state entry
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def build_train_dataset(
    sources: Sequence[dict[str, Any]],
    *,
    tokenizer: TokenizerInfo,
    max_seq_len: int,
    global_batch_size: int,
    micro_batch_size: int = 1,
    world_size: int | None = None,
    mlm_probability: float | MaskingSchedule = 0.3,
    seed: int = 17,
    lookahead: int = 512,
    batch_size_warmup: dict[str, int] | None = None,
    shuffle: bool = True,
    shuffle_algo: str = "py1e",
    shuffle_block_size: int | None = None,
    num_canonical_nodes: int | None = None,
    epoch_size: int | None = None,
    predownload: int | None = None,
    cache_limit: int | str | None = None,
    drop_last: bool = True,
) -> PackedMLMDataset:
    """The training stream.

    sources: list of {name?, local and/or remote, split?, proportion | repeat | choose} (streaming's
        Stream arguments). global_batch_size: rows (sequences of max_seq_len slots) per optimizer
        step, all ranks together. world_size: defaults to the environment's (RANK/WORLD_SIZE).
    batch_size_warmup: {"start": rows, "tokens": row slots} grows the batch linearly from `start`
        to global_batch_size over that many tokens, in steps of micro_batch_size * world_size.
    lookahead: chunks buffered for best-fit packing. epoch_size: samples per epoch (streaming).
    mlm_probability: the masking ratio, or a MaskingSchedule over the global batch index.
    """
    schedule = batch_size_schedule(
        global_batch_size=global_batch_size,
        max_seq_len=max_seq_len,
        micro_batch_size=micro_batch_size,
        world_size=world_size,
        batch_size_warmup=batch_size_warmup,
    )
    samples = build_sample_space(
        sources,
        shuffle=shuffle,
        seed=seed,
        shuffle_algo=shuffle_algo,
        shuffle_block_size=shuffle_block_size,
        num_canonical_nodes=num_canonical_nodes,
        epoch_size=epoch_size,
        predownload=predownload,
        cache_limit=cache_limit,
    )
    return PackedMLMDataset(
        samples,
        tokenizer=tokenizer,
        max_seq_len=max_seq_len,
        schedule=schedule,
        mlm_probability=mlm_probability,
        seed=seed,
        lookahead=lookahead,
        drop_last=drop_last,
        resumable=True,
        prefetch_shards=any(source.get("remote") for source in sources),
    )


def batch_size_schedule(
    *,
    global_batch_size: int,
    max_seq_len: int,
    micro_batch_size: int = 1,
    world_size: int | None = None,
    batch_size_warmup: dict[str, int] | None = None,
) -> BatchSizeSchedule:
    """The rows of every global batch, as `build_train_dataset` with the same arguments will make them (a
    caller turning sample or token counts into batch indices, as for a masking schedule, asks this)."""
    return BatchSizeSchedule(
        global_rows=global_batch_size,
        max_seq_len=max_seq_len,
        micro_batch_size=micro_batch_size,
        world_size=_world_size(world_size),
        **_parse_warmup(batch_size_warmup),
    )


def build_eval_dataset(
    sources: Sequence[dict[str, Any]],
    *,
    tokenizer: TokenizerInfo,
    max_seq_len: int,
    global_batch_size: int,
    world_size: int | None = None,
    mlm_probability: float = 0.15,
    seed: int = 17,
    lookahead: int = 512,
) -> PackedMLMDataset:
    """The evaluation stream: no shuffling, fixed masks, every iteration identical and finite, the
    last partial batch kept."""
    world_size = _world_size(world_size)
    samples = build_sample_space(sources, shuffle=False, seed=seed)
    return PackedMLMDataset(
        samples,
        tokenizer=tokenizer,
        max_seq_len=max_seq_len,
        schedule=BatchSizeSchedule(
            global_rows=global_batch_size, max_seq_len=max_seq_len, world_size=world_size
        ),
        mlm_probability=mlm_probability,
        seed=seed,
        lookahead=lookahead,
        drop_last=False,
        resumable=False,
        prefetch_shards=any(source.get("remote") for source in sources),
    )


def _world_size(world_size: int | None) -> int:
    detected = World.detect().num_ranks
    if world_size is not None and world_size != detected:
        raise ValueError(f"world_size={world_size} but the environment (WORLD_SIZE) has {detected} ranks")
    return detected


def _parse_warmup(config: dict[str, int] | None) -> dict[str, int]:
    if config is None:
        return {}
    if not isinstance(config, dict) or set(config) != {"start", "tokens"}:
        raise ValueError(f"batch_size_warmup: expected {{start: rows, tokens: count}}, got {config!r}")
    for key in ("start", "tokens"):
        if isinstance(config[key], bool) or not isinstance(config[key], int):
            raise ValueError(f"batch_size_warmup.{key}: expected an integer, got {config[key]!r}")
    return {"start_rows": config["start"], "warmup_tokens": config["tokens"]}
