"""PackedMLMDataset: a torch IterableDataset yielding whole packed, masked batches, resumable exactly.

Producers. With a DataLoader of W workers each rank runs W producers (one with no workers). A
producer reads its own part of the epoch (streaming's partition), splits each document into
chunks, packs chunks into rows (each started by a random buffered chunk) and rows into batches,
and masks each chunk at its batch's scheduled ratio. The row starts come from a generator keyed by
the batch's global index and the masks from one keyed by the chunk, so a producer's whole state
after a batch is small: (epoch, cursor into its sample list, keys of the buffered chunks, batches
emitted). Every batch carries
that snapshot under `pack_state`.

Order. The loader (loader.py) takes the batches in turn over producers, passing over a producer that
has run dry, and the epoch ends when every producer has (the last partial batch of each dropped, with
`drop_last`). Producer p's e-th batch of an epoch is keyed `batches_before_epoch + p + e * W`, which
the batch-size schedule, the masking schedule and the row starts are placed by. While every producer
still has batches that is the batch's global index on every rank; after one ran dry the key runs
ahead of it (by the dry producers' turns since), so the epoch's tail takes the sizes and ratios of
somewhat later batches: the same once a batch-size warmup is over. Ending the epoch at the first dry
producer instead would drop the other producers' unread documents from every epoch: with one long
document, nearly the whole epoch.

Resume. The trainer pops `pack_state` with `observe(batch)` for each batch it trains on; the main
process keeps the latest snapshot of each producer. `state_dict` returns them (from every rank
under torch.distributed); `load_state_dict` stages them, and the next iteration restarts each
producer from its snapshot (a producer that had run dry runs dry again at once), handing producer
(n + w) % W to worker w, where n (`next_producer`) is the producer after the last trained batch's, so
the turns go on where they stopped. The state format is documented in docs/internals.md.

Batch size. The state also counts the rows trained (all ranks), and each iteration places the
batch-size schedule there (`BatchSizeSchedule.continue_from`): a run resumed with another global
batch size, micro-batch size or world size goes on with this recipe's sizes from the rows it really
trained (the batch-size warmup included), and a masking schedule over rows (`MaskingSchedule`
unit "row") masks each batch at the ratio of the rows trained before it.

Another topology. A state saved by another number of ranks or workers cannot restart its producers
(the epoch's partition depends on both). The rest of the epoch is then read as this topology's
partition without the documents the old producers had read (each old producer's order up to its
cursor, recomputed from streaming's partition; of a sample the mixture repeats, as many occurrences as
were read); the chunks that waited in the old packers' lookahead are skipped, and logged. The global batch
index and the rows trained go on. A state keeps these earlier topologies (`history`) until its epoch ends,
so a later change still knows them.
"""

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from streaming import StreamingDataset
from streaming.base.batching import generate_work
from streaming.base.world import World
from torch.utils.data import IterableDataset, get_worker_info

from modernbert_train.data.batch_schedule import BatchSizeSchedule
from modernbert_train.data.chunking import chunk_bounds, wrap_chunk
from modernbert_train.data.masking import MaskingSchedule, chunk_rng, mask_tokens
from modernbert_train.data.mixture import (
    ShardPrefetcher,
    epoch_sample_ids,
    evaluation_sample_ids,
    read_sample,
)
from modernbert_train.data.packing import BestFitPacker, Chunk, rows_to_batch
from modernbert_train.data.tokens import TokenizerInfo

STATE_FORMAT = "modernbert_train.data/packed-v2"
# How a topology's producers leave out what earlier topologies of the epoch read (kept in the state, so a
# state saved by older code is read by its own rule): 1, every occurrence of a read sample id (which
# dropped the later repeats of a source the mixture repeats); 2, as many occurrences as were read.
READ_RULE = 2

log = logging.getLogger(__name__)


class PackedMLMDataset(IterableDataset):
    def __init__(
        self,
        samples: StreamingDataset,
        *,
        tokenizer: TokenizerInfo,
        max_seq_len: int,
        schedule: BatchSizeSchedule,
        mlm_probability: float | MaskingSchedule,
        seed: int,
        lookahead: int,
        drop_last: bool = True,
        resumable: bool = True,
        prefetch_shards: bool = False,
    ):
        """`resumable=True` is the training stream: epochs advance by one per iteration, the last
        partial batch of an epoch is dropped (`drop_last`), strict round robin, `pack_state` kept
        for `observe`. `resumable=False` is evaluation: the same epoch every time, all batches.
        `mlm_probability`: one ratio, or a schedule over the global batch index."""
        if max_seq_len < 3:
            raise ValueError(f"max_seq_len must be >= 3 to hold [CLS] token [SEP], got {max_seq_len}")
        if not isinstance(mlm_probability, MaskingSchedule):
            if not 0.0 < mlm_probability < 1.0:
                raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
            mlm_probability = MaskingSchedule((mlm_probability,))
        self.samples = samples
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.schedule = schedule
        self.masking = mlm_probability
        self.seed = seed
        self.lookahead = lookahead
        self.drop_last = drop_last
        self.resumable = resumable
        self.prefetch_shards = prefetch_shards
        world = World.detect()
        self.rank, self.world_size, self.num_nodes = world.rank, world.num_ranks, world.num_nodes
        if schedule.world_size != self.world_size:
            raise ValueError(
                f"world_size={schedule.world_size} but the environment has {self.world_size} ranks"
            )

        # Main-process bookkeeping: where the stream this rank trained on stands.
        self.epoch = 0
        self._iterated = False  # an iteration of self.epoch has begun
        self._batches_seen = 0  # batches observed since training began, all epochs
        self._batches_in_epoch = 0
        self._rows_seen = 0  # rows (all ranks) of those batches
        self._num_producers = 1
        self._next_producer = 0  # whose turn the batch after the last observed one is
        self._dry: set[int] = set()  # producers of this epoch the loader passed over: they have run dry
        self._observed: dict[int, dict[str, Any]] = {}  # producer -> latest pack_state
        self._pending: dict[str, Any] | None = None  # this rank's state from load_state_dict
        self._saved_ranks: list[dict[str, Any]] = []  # every rank's, for another number of workers
        self._plan: dict[str, Any] | None = None  # what the current iteration's producers start from
        self.last_mlm_probability: float | None = None  # the ratio the last observed batch was masked at

    # -- main process -------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration cover `epoch` from its start (unless a loaded state already
        resumes that epoch). Optional: without it each iteration advances one epoch."""
        if self._pending is not None and self._pending["epoch"] == epoch:
            return
        self.epoch, self._iterated, self._pending = epoch, False, None

    def begin_iteration(self, num_producers: int) -> dict[str, Any]:
        """Decide what the producers of the coming iteration start from (the loader calls this
        before its workers start, so they inherit the plan)."""
        if self._pending is not None:
            plan, self._pending = self._pending, None
            saved = plan["num_producers"]
            if saved is not None and saved != num_producers:
                plan = self._continue_elsewhere(self._saved_ranks)
        else:
            if self._iterated and self.resumable:
                self.epoch += 1
            plan = self._fresh_state(self.epoch)
        plan = {**plan, "num_producers": num_producers}
        self.epoch = plan["epoch"]
        self._batches_seen = plan["batches_before_epoch"] + plan["batches_in_epoch"]
        if plan.get("rows_trained") is None:  # a state saved before rows were counted: this recipe's sizes
            plan["rows_trained"] = self.schedule.rows_before(self._batches_seen)
        self._rows_seen = plan["rows_trained"]
        self.schedule.continue_from(self._batches_seen, self._rows_seen)
        self._batches_in_epoch = plan["batches_in_epoch"]
        self._observed = dict(plan["producers"])
        self._num_producers = num_producers
        if plan.get("next_producer") is None:  # a state saved before it was kept: strict round robin
            plan["next_producer"] = plan["batches_in_epoch"] % num_producers
        self._next_producer = plan["next_producer"]
        self._dry = set(plan.setdefault("dry", []))
        self._iterated = True
        if plan["history"]:
            plan["unread"] = self._unread_parts(plan)
        self._plan = plan
        return plan

    def ran_dry(self, producer: int) -> None:
        """The loader passed over `producer`'s turn: it has no batch left this epoch (saved, so that a
        resume does not start it again: its batch keys would lie before the resumed position)."""
        self._dry.add(producer)

    def observe(self, batch: dict[str, Any]) -> None:
        """Record the producer snapshot of a batch about to be trained on; pops `pack_state` so the
        batch holds tensors only. A batch without one (already observed) is left alone."""
        state = batch.pop("pack_state", None)
        if state is None:
            return
        self.last_mlm_probability = state.pop("mlm_probability")
        self._rows_seen += state.pop("global_rows")
        self._observed[state["producer"]] = state
        self._next_producer = (state["producer"] + 1) % self._num_producers
        self._batches_seen += 1
        self._batches_in_epoch += 1

    def state_dict(self, num_samples: int = -1, from_beginning: bool = True) -> dict[str, Any]:
        """Every rank's stream state (Composer calls this on all ranks; rank 0 writes it).

        `num_samples` is Composer's sample count in the current epoch: 0 after batches of this
        epoch were observed means the epoch has ended, so the state points at the next epoch."""
        del from_beginning  # we count batches ourselves
        local = self._rank_state(num_samples)
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks: list[Any] = [None] * self.world_size
            dist.all_gather_object(ranks, local)
        else:
            ranks = [local]
        # One JSON string, not nested containers: a sharded (torch.distributed.checkpoint) load fills only
        # the keys the fresh run's own state already has, which would drop every producer snapshot.
        return {"format": STATE_FORMAT, "ranks": json.dumps(ranks)}

    def load_state_dict(self, obj: dict[str, Any] | None) -> None:
        """Stage this rank's part of a `state_dict`; the next iteration resumes from it."""
        if obj is None:
            return
        if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
            raise ValueError(
                f"data state: not a {STATE_FORMAT} state (was the checkpoint written by another loader?)"
            )
        ranks = json.loads(obj["ranks"])
        for rank_state in ranks:
            # JSON keeps no int keys or tuples: producers and buffered chunk keys back to their own types.
            rank_state["producers"] = {
                int(producer): {**state, "buffer": [tuple(key) for key in state["buffer"]]}
                for producer, state in rank_state["producers"].items()
            }
        self._saved_ranks = ranks
        same_world = len(ranks) == self.world_size
        self._pending = ranks[self.rank] if same_world else self._continue_elsewhere(ranks)
        self.epoch = self._pending["epoch"]

    def _fresh_state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "batches_before_epoch": self._batches_seen,
            "batches_in_epoch": 0,
            "rows_trained": self._rows_seen,
            "num_producers": None,
            "next_producer": 0,
            "dry": [],
            "producers": {},
            "history": [],
            "read_rule": READ_RULE,
        }

    def _continue_elsewhere(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        """A plan for this topology from every rank's state saved by another: the old producers' reading
        becomes one more `history` segment; "batches_before_epoch" counts every batch trained so far, so
        the batch-size schedule goes on. Chunks waiting in the old packers are skipped, and logged."""
        saved = ranks[0]
        plan = {
            **self._fresh_state(saved["epoch"]),
            "batches_before_epoch": saved["batches_before_epoch"] + saved["batches_in_epoch"],
            "rows_trained": saved.get("rows_trained"),
            "history": list(saved.get("history", [])),
        }
        if not saved["producers"]:  # nothing read since the epoch (or the last topology) began
            return plan
        num_producers = saved["num_producers"]
        plan["history"].append(
            {
                "num_nodes": saved["num_nodes"],
                "num_canonical_nodes": saved["num_canonical_nodes"],
                "num_producers": num_producers,
                "read_rule": saved.get("read_rule", 1),  # how its producers left out earlier reads
                "cursors": [
                    [rank["producers"].get(p, {"cursor": 0})["cursor"] for p in range(num_producers)]
                    for rank in ranks
                ],
            }
        )
        waiting = [key for rank in ranks for state in rank["producers"].values() for key in state["buffer"]]
        if self.rank == 0:
            log.warning(
                "data: resuming on %d rank(s) a stream saved by %d rank(s) x %d producer(s): skipped %d "
                "document(s) (%d chunk(s)) waiting in the packers' lookahead; no document is read twice",
                self.world_size, len(ranks), num_producers, len({sample_id for sample_id, _ in waiting}),
                len(waiting),
            )  # fmt: skip
        return plan

    def _topology_lists(self, epoch: int, num_nodes: int, num_ranks: int, num_producers: int) -> list:
        """Every producer's sample ids of `epoch` under a topology, in (rank, producer) order: streaming's
        partition (its work, minus the -1 padding), at the dataset's current canonical node count."""
        ranks_per_node = num_ranks // num_nodes
        world = World(num_nodes, ranks_per_node, num_producers, 0)
        work = generate_work(self.samples.batching_method, self.samples, world, epoch, 0)
        lists = []
        for rank in range(num_ranks):
            node, rank_of_node = divmod(rank, ranks_per_node)
            for producer in range(num_producers):
                ids = work[node, rank_of_node, producer].ravel()
                lists.append(ids[ids >= 0])
        return lists

    def _read_counts(self, epoch: int, history: list[dict[str, Any]]) -> np.ndarray:
        """How many times the producers of earlier topologies read each sample id of `epoch`: each its own
        order, minus what the topologies before it read (by its `read_rule`), up to its cursor."""
        counts = np.zeros(self.samples.num_samples, dtype=np.int32)  # reads per id: a few, not billions
        own_canonical_nodes = self.samples.num_canonical_nodes
        try:
            for segment in history:
                # The shuffle depends on the canonical node count, which follows the node count by default.
                self.samples.num_canonical_nodes = segment["num_canonical_nodes"]
                cursors, num_producers = segment["cursors"], segment["num_producers"]
                lists = self._topology_lists(epoch, segment["num_nodes"], len(cursors), num_producers)
                unread = _not_read(lists, counts, segment.get("read_rule", 1))
                flat_cursors = [cursor for rank_cursors in cursors for cursor in rank_cursors]
                newly_read = [ids[keep][:cursor] for ids, keep, cursor in zip(lists, unread, flat_cursors)]
                np.add.at(counts, np.concatenate(newly_read), 1)
        finally:
            self.samples.num_canonical_nodes = own_canonical_nodes
        return counts

    def _unread_parts(self, plan: dict[str, Any]) -> dict[int, "UnreadPart"]:
        """Which entries of each of this rank's producers' sample ids earlier topologies of the epoch left
        unread. Computed once per rank here, in the main process before the workers start (they inherit
        it), not in every producer: each topology's partition is the whole epoch's sample ids (8 bytes per
        document drawn, several times over while streaming builds it), too much for every worker of every
        rank of a node at once. A producer gets one bit per sample id."""
        epoch, num_producers = plan["epoch"], plan["num_producers"]
        counts = self._read_counts(epoch, plan["history"])
        lists = self._topology_lists(epoch, self.num_nodes, self.world_size, num_producers)
        rule = plan.get("read_rule", 1)
        # Rule 2: a sample the mixture repeats appears several times in an epoch: as many of its
        # occurrences are left out as were read, the first ones over this topology's producers in (rank,
        # producer) order, so every rank decides alike. Rule 1 decides per list.
        ours = slice(self.rank * num_producers, (self.rank + 1) * num_producers)
        mine = lists[ours]
        unread = _not_read(mine, counts, 1) if rule == 1 else _not_read(lists, counts, rule)[ours]
        del lists, counts
        return {producer: UnreadPart.of(ids, keep) for producer, (ids, keep) in enumerate(zip(mine, unread))}

    def _rank_state(self, num_samples: int) -> dict[str, Any]:
        if self._pending is not None:
            return self._pending
        if not self._iterated:
            return self._fresh_state(self.epoch)
        if num_samples == 0 and self._batches_in_epoch > 0:
            return self._fresh_state(self.epoch + 1 if self.resumable else self.epoch)
        return {
            "epoch": self.epoch,
            "batches_before_epoch": self._batches_seen - self._batches_in_epoch,
            "batches_in_epoch": self._batches_in_epoch,
            "rows_trained": self._rows_seen,
            "num_producers": self._num_producers,
            "next_producer": self._next_producer,
            "dry": sorted(self._dry),
            "producers": dict(self._observed),
            "num_nodes": self.num_nodes,
            "num_canonical_nodes": self.samples.num_canonical_nodes,
            "history": self._plan["history"],
            "read_rule": self._plan.get("read_rule", 1),
        }

    # -- producers (DataLoader workers, or the main process with num_workers=0) ---------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Not a generator function: the plan is read now, when the DataLoader creates its iterator.
        plan = self._plan if self._plan is not None else {**self._fresh_state(self.epoch), "num_producers": 1}
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != plan["num_producers"]:
            raise RuntimeError(f"planned {plan['num_producers']} producers but running {num_workers} workers")
        producer = (worker + plan["next_producer"]) % num_workers
        return self._produce(plan, producer)

    def _produce(self, plan: dict[str, Any], producer: int) -> Iterator[dict[str, Any]]:
        num_producers, epoch = plan["num_producers"], plan["epoch"]
        snapshot = plan["producers"].get(producer)
        if self.resumable:
            sample_ids = epoch_sample_ids(self.samples, epoch, producer, num_producers)  # with every worker
        else:  # each sample once over the ranks, which may then make different numbers of batches
            part, parts = self.rank * num_producers + producer, self.world_size * num_producers
            sample_ids = evaluation_sample_ids(self.samples, epoch, part, parts)
        if producer in plan.get("dry", ()):
            return  # it ran dry before the state was saved
        if plan["history"]:
            sample_ids = plan["unread"][producer].apply(sample_ids)
        packer = BestFitPacker(self.max_seq_len, self.lookahead)
        cursor, emitted = 0, 0
        stream = 0 if self.resumable else 1  # row starts: a generator per (stream, rank, global batch)
        if snapshot is not None:
            cursor, emitted = snapshot["cursor"], snapshot["batches_emitted"]
            self._refill(packer, snapshot["buffer"])
        prefetcher = ShardPrefetcher(self.samples, sample_ids, cursor) if self.prefetch_shards else None
        try:
            while True:
                batch_index = plan["batches_before_epoch"] + producer + emitted * num_producers
                wanted = self.schedule.rank_rows(batch_index)
                starts = np.random.default_rng([self.seed, stream, self.rank, batch_index])
                rows = []
                while len(rows) < wanted:
                    while not packer.full and cursor < len(sample_ids):
                        for chunk in self._document_chunks(int(sample_ids[cursor])):
                            packer.add(chunk)
                        cursor += 1
                        if prefetcher is not None:
                            prefetcher.position = cursor
                    if not len(packer):
                        break
                    rows.append(packer.next_row(starts))
                if not rows or (len(rows) < wanted and self.drop_last):
                    return
                rate = self.masking.rate(
                    batch_index if self.masking.unit == "batch" else self.schedule.rows_before(batch_index)
                )
                batch = rows_to_batch(
                    rows,
                    self.max_seq_len,
                    self.tokenizer.pad_id,
                    mask=lambda chunk, rate=rate: self._mask(chunk, epoch, rate),
                )
                emitted += 1
                batch["pack_state"] = {
                    "rank": self.rank,
                    "producer": producer,
                    "epoch": epoch,
                    "cursor": cursor,
                    "buffer": packer.buffered_keys(),
                    "batches_emitted": emitted,
                    "mlm_probability": rate,  # popped by observe with global_rows (not saved in the snapshot)
                    "global_rows": self.schedule.rows(batch_index),
                }
                yield batch
        finally:
            if prefetcher is not None:
                prefetcher.close()

    def unlabelled_batch(self) -> dict[str, Any]:
        """One row holding an empty document ([CLS] [SEP]) and nothing labelled: what an evaluation rank whose
        part has run out yields while another still evaluates (it adds nothing to a labelled-token metric)."""
        empty = np.array([self.tokenizer.cls_id, self.tokenizer.sep_id], dtype=np.int64)
        return rows_to_batch([[Chunk(key=(-1, 0), input_ids=empty)]], self.max_seq_len, self.tokenizer.pad_id)

    def _mask(self, chunk: Chunk, epoch: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
        return mask_tokens(chunk.input_ids, chunk_rng(self.seed, epoch, *chunk.key), rate, self.tokenizer)

    def _document_chunks(self, sample_id: int) -> list[Chunk]:
        tokens = read_sample(self.samples, sample_id)["input_ids"]
        cls_id, sep_id = self.tokenizer.cls_id, self.tokenizer.sep_id
        return [
            Chunk(key=(sample_id, i), input_ids=wrap_chunk(tokens[start:end], cls_id, sep_id))
            for i, (start, end) in enumerate(chunk_bounds(len(tokens), self.max_seq_len))
        ]

    def _refill(self, packer: BestFitPacker, keys: list[tuple[int, int]]) -> None:
        """Put the buffered chunks of a snapshot back, in their order, re-reading their documents."""
        documents: dict[int, list[Chunk]] = {}
        for sample_id, chunk_index in keys:
            if sample_id not in documents:
                documents[sample_id] = self._document_chunks(sample_id)
            packer.add(documents[sample_id][chunk_index])


def batch_num_rows(batch: dict[str, Any]) -> int:
    """Rows in a batch (Composer's samples), for a DataSpec: `pack_state` hides it from Composer's default."""
    return int(batch["input_ids"].shape[0])


def batch_num_tokens(batch: dict[str, Any]) -> int:
    """Real (non-pad) tokens in a batch."""
    return int(torch.count_nonzero(batch["attention_mask"]))


@dataclass(frozen=True)
class UnreadPart:
    """A producer's sample ids of the epoch left unread by earlier topologies: which (one bit each), and
    a fingerprint of the ids it was decided for."""

    length: int
    digest: bytes
    bits: np.ndarray  # np.packbits of the keep mask

    @classmethod
    def of(cls, ids: np.ndarray, keep: np.ndarray) -> "UnreadPart":
        return cls(len(ids), _digest(ids), np.packbits(keep))

    def apply(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) != self.length or _digest(ids) != self.digest:
            raise RuntimeError("data: streaming's partition for this producer differs from the epoch's work")
        return ids[np.unpackbits(self.bits, count=self.length).astype(bool)]


def _digest(ids: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


def _not_read(lists: list[np.ndarray], counts: np.ndarray, rule: int) -> list[np.ndarray]:
    """Per list, which entries were not read before: rule 1, ids never read; rule 2, an id's occurrences
    over all the lists (in their order) past the first counts[id], the ones read."""
    if rule == 1:
        return [counts[ids] == 0 for ids in lists]
    flat = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    unread = np.ones(len(flat), dtype=bool)
    # Only the entries of ids read before are ranked (the epoch's rest may be a billion documents).
    where = np.flatnonzero(counts[flat] > 0)
    if len(where):
        ids = flat[where]
        order = np.argsort(ids, kind="stable")  # each id's entries, in list order
        ordered = ids[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        first_of_group = np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
        occurrence = np.empty(len(ids), dtype=np.int64)
        occurrence[order] = np.arange(len(ids)) - first_of_group
        unread[where] = occurrence >= counts[ids]
    return np.split(unread, np.cumsum([len(ids) for ids in lists])[:-1])
