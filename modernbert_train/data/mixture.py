"""The sample space: a mixture of MDS sources as one streaming `StreamingDataset`.

Streaming does the mixing (proportion / repeat / choose), the shard-aware shuffle, the partition
over nodes, ranks and workers, and the downloads and caching of remote shards. We only read its
per-(rank, worker) sample order for an epoch (`epoch_sample_ids`) and fetch samples by id, so a
packer can restart from any position in that order without replaying the epoch.
"""

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch.distributed as dist
from streaming import Stream, StreamingDataset
from streaming.base import dataset as streaming_dataset
from streaming.base.dataset import _ShardState
from streaming.base.world import World

from modernbert_train.data.shared_memory import (
    agreed_shm_prefix,
    registration_lock,
    remove_stale_streaming_filelocks,
    remove_stale_streaming_segments,
)

log = logging.getLogger(__name__)

SOURCE_KEYS = ("name", "local", "remote", "split", "proportion", "repeat", "choose")
PREFIX_ATTEMPTS = 5


def validate_sources(sources: Sequence[dict[str, Any]]) -> None:
    """One-line errors naming the source index and key."""
    if isinstance(sources, dict) or not isinstance(sources, Sequence) or not sources:
        raise ValueError(
            "data sources: expected a non-empty list of {local|remote, proportion|repeat|choose}"
        )
    weighted_by_proportion = None
    for i, source in enumerate(sources):
        where = f"data source {i}" + (
            f" ({source['name']})" if isinstance(source, dict) and "name" in source else ""
        )
        if not isinstance(source, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(source).__name__}")
        unknown = sorted(set(source) - set(SOURCE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(SOURCE_KEYS)})")
        if not source.get("local") and not source.get("remote"):
            raise ValueError(f"{where}: needs 'local' or 'remote'")
        for key in ("name", "local", "remote", "split"):
            if key in source and not isinstance(source[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {source[key]!r}")
        weights = [key for key in ("proportion", "repeat", "choose") if key in source]
        if len(weights) > 1:
            raise ValueError(f"{where}: give at most one of 'proportion', 'repeat', 'choose' (got {weights})")
        for key in weights:
            value = source[key]
            valid = isinstance(value, int) if key == "choose" else isinstance(value, (int, float))
            if isinstance(value, bool) or not valid or value <= 0:
                raise ValueError(f"{where}: {key!r} must be a positive number, got {value!r}")
        has_proportion = "proportion" in source
        if weighted_by_proportion is None:
            weighted_by_proportion = has_proportion
        elif has_proportion != weighted_by_proportion:
            raise ValueError(
                f"{where}: 'proportion' cannot be mixed with 'repeat'/'choose'/unweighted sources"
            )


def build_sample_space(
    sources: Sequence[dict[str, Any]],
    *,
    shuffle: bool,
    seed: int,
    shuffle_algo: str = "py1e",
    shuffle_block_size: int | None = None,
    num_canonical_nodes: int | None = None,
    epoch_size: int | None = None,
    predownload: int | None = None,
    cache_limit: int | str | None = None,
) -> StreamingDataset:
    """One StreamingDataset over every source. Build it in the main process; iterate it only
    through `epoch_sample_ids` (in DataLoader workers, or in the main process with no workers)."""
    validate_sources(sources)
    if num_canonical_nodes is None:
        num_canonical_nodes = World.detect().num_nodes
    if shuffle_block_size is None:
        shuffle_block_size = max(4_000_000 // num_canonical_nodes, 1 << 18)  # streaming's own default
    kwargs = dict(
        shuffle=shuffle,
        shuffle_algo=shuffle_algo,
        shuffle_seed=seed,
        shuffle_block_size=shuffle_block_size,
        num_canonical_nodes=num_canonical_nodes,
        epoch_size=epoch_size,
        predownload=predownload,
        cache_limit=cache_limit,
        batch_size=1,  # streaming groups samples into device batches; we pack, so one sample each
    )
    sources = [_readable_in_place(source) for source in sources]
    single = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
    rng = np.random.default_rng()
    streaming_dataset.get_shm_prefix = agreed_shm_prefix  # what StreamingDataset.__init__ calls
    with registration_lock():  # other jobs on this host register their prefixes before or after us
        # Killed runs' segments and locks would otherwise stay; a later job on the host can fail on them.
        remove_stale_streaming_segments()
        remove_stale_streaming_filelocks()
        for attempt in range(PREFIX_ATTEMPTS):
            try:
                # fresh Streams each time: streaming writes its resolved proportions into those it is given
                streams = [Stream(**{k: v for k, v in source.items() if k != "name"}) for source in sources]
                samples = _SampleSpace(streams=streams, **kwargs)
                break
            except FileExistsError:
                # A streaming job outside this lock took the prefix between our look and our creation.
                # One process may look again (nothing was registered); ranks would leave the protocol at
                # different barriers.
                if not single or attempt == PREFIX_ATTEMPTS - 1:
                    raise
                time.sleep(rng.uniform(0.05, 0.5))
    for i, (source, stream) in enumerate(zip(sources, samples.streams)):
        if stream.choose == 0:  # streaming rounds each source's draws down, then hands out the remainder
            where = f"data source {i}" + (f" ({source['name']})" if "name" in source else "")
            weighted = [f"{key} {source[key]}" for key in ("proportion", "repeat") if key in source]
            weight = weighted[0] if weighted else "share"
            held = int(samples.samples_per_stream[i])
            raise ValueError(
                f"{where}: its {weight} draws none of its {held} documents in any epoch (of "
                f"{samples.epoch_size} drawn); raise it, or leave the source out"
            )
    return samples


class _SampleSpace(StreamingDataset):
    """streaming's dataset, where a shard that failed to prepare (damaged, vanished) is not left claimed, nor
    its damaged copy left in a remote stream's cache."""

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        counted = self._shard_states[shard_id] == _ShardState.LOCAL  # its files are in cache_usage
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception:
            # The failed call moved the shard to PREPARING, in memory shared by every rank and worker of the
            # node; left there, each of them that reads the shard waits forever. REMOTE makes the next reader
            # prepare it itself, and fail with this error too if the shard is damaged.
            with self._cache_filelock:
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    self._forget_cached_copy(shard_id, counted)
                    self._shard_states[shard_id] = _ShardState.REMOTE
            raise

    def _forget_cached_copy(self, shard_id: int, counted: bool) -> None:
        """A remote stream's local folder is a cache: what the failed preparation left there (a damaged
        download, a half-written decompression) is deleted, so the next reader fetches the shard again (a
        fixed re-upload then reads, in this run or the next) instead of failing on the cached copy forever.
        A stream without a remote is its own source and is never touched."""
        stream = self.streams[self.stream_per_shard[shard_id]]
        if not stream.remote or stream.remote == stream.local:
            return
        freed = self.shards[shard_id].evict()
        if counted:
            self.cache_usage = max(0, self.cache_usage - freed)


def _readable_in_place(source: dict[str, Any]) -> dict[str, Any]:
    """A local source streaming cannot write into (a read-only mount: it decompresses each shard next to
    itself) is read as a remote of itself into a cache folder. The cache is named by the folder and its
    index.json's identity, so a rewritten dataset gets a fresh one, and every rank and worker of a node the
    same."""
    if source.get("remote") or not source.get("local"):
        return source
    folder = os.path.join(source["local"], source["split"]) if source.get("split") else source["local"]
    index = os.path.join(folder, "index.json")
    if os.access(folder, os.W_OK) or not os.path.isfile(index):
        return source  # a missing index is data_checks' to report
    stat = os.stat(index)
    identity = f"{os.path.realpath(folder)}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    cache = os.path.join(
        tempfile.gettempdir(), "modernbert-streams", hashlib.sha256(identity).hexdigest()[:16]
    )
    log.warning("data: %s is read-only; its shards are decompressed into %s", folder, cache)
    return {**source, "remote": source["local"], "local": cache}


def epoch_sample_ids(samples: StreamingDataset, epoch: int, producer: int, num_producers: int) -> np.ndarray:
    """The sample ids producer `producer` of this rank reads in `epoch`, in order.

    This is streaming's own partition (`_get_work`, what `StreamingDataset.__iter__` iterates),
    asked for a given producer so a resumed run can hand a producer's work to any worker. Every
    DataLoader worker of every rank on the node must call it together (streaming computes the
    epoch once per node and shares it through shared memory). Private API of the pinned
    mosaicml-streaming 0.13.0.
    """
    samples._unique_worker_world = samples._unique_rank_world.detect_workers()
    rank_world = samples._parallel_rank_world
    samples._parallel_worker_world = World(
        num_nodes=rank_world.num_nodes,
        ranks_per_node=rank_world.ranks_per_node,
        workers_per_rank=num_producers,
        worker=rank_world.rank * num_producers + producer,
    )
    ids = samples._get_work(epoch, 0)
    return ids[ids >= 0]  # -1 pads the partition; it names no sample


def evaluation_sample_ids(samples: StreamingDataset, epoch: int, part: int, num_parts: int) -> np.ndarray:
    """Part `part` of the epoch's samples cut in `num_parts` contiguous parts, in order: every sample of the
    epoch once over all the parts (an evaluation's ranks x producers).

    Not streaming's partition: it pads every rank to the same count by repeating samples, which a metric
    would count twice. `resample_streams` is the epoch's sample list (each source's `repeat`/`choose`/
    `proportion` applied) before that partition, in order when unshuffled (streaming 0.13.0)."""
    _, sample_ids = samples.resample_streams(epoch)
    return np.array_split(np.asarray(sample_ids, dtype=np.int64), num_parts)[part]


class ShardPrefetcher:
    """Downloads the shards of upcoming samples in a background thread, a bounded distance ahead
    of the reader, so remote streams don't stall the packer. Local streams need none."""

    def __init__(self, samples: StreamingDataset, sample_ids: np.ndarray, start: int, ahead: int = 256):
        self._samples = samples
        self._shard_ids = samples.spanner  # sample id -> (shard id, index in shard)
        self._sample_ids = sample_ids
        self._ahead = ahead
        self.position = start  # the reader advances this
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self._thread.start()

    def _run(self, next_index: int) -> None:
        prepared: set[int] = set()
        while next_index < len(self._sample_ids) and not self._stop.is_set():
            if next_index >= self.position + self._ahead:
                self._stop.wait(0.01)
                continue
            shard_id, _ = self._shard_ids[int(self._sample_ids[next_index])]
            if shard_id not in prepared:
                # A shard that fails here is the reader's to report: it prepares the shard again and
                # read_sample names it (or it succeeds, if the failure was passing).
                with contextlib.suppress(Exception):
                    self._samples.prepare_shard(shard_id, blocking=False)
                prepared.add(shard_id)
            next_index += 1

    def close(self) -> None:
        self._stop.set()


class ShardReadError(RuntimeError):
    """A shard that cannot be read; the message is one line naming the shard and its stream."""


def read_sample(samples: StreamingDataset, sample_id: int) -> dict[str, Any]:
    """`samples[sample_id]`, with a damaged shard (say zstd's "Data corruption detected") named."""
    try:
        return samples[sample_id]
    except Exception as e:
        shard_id = int(samples.spanner[sample_id][0])
        stream = samples.streams[int(samples.stream_per_shard[shard_id])]
        shard = samples.shards[shard_id]
        name = (shard.zip_data or shard.raw_data).basename
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShardReadError(
            f"shard {name} of stream {stream.remote or stream.local} cannot be read: {reason}"
        ) from e
