"""Tokenize whole documents in worker processes and write them, in input order, as MDS shards.

The parent reads documents and cuts them into batches; `workers` processes encode the batches
(single-threaded each) into the bytes of the `input_ids` column, while the parent writes finished batches
in submission order, so the shards are byte-identical whatever the number of workers. Columns: `input_ids`
(ndarray of the tokenizer's smallest unsigned dtype, no special tokens), `doc_id` (int64, running index),
`source` (str).
"""

import json
import os
import re
import shutil
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data_prep.errors import UsageError
from data_prep.output_dir import staged_output
from data_prep.read_report import ReadReport
from data_prep.readers import Document
from data_prep.tokenizer_load import LoadedTokenizer, for_sharding

METADATA_FILE = "modernbert_data.json"
FORMAT_VERSION = 1
DEFAULT_SIZE_LIMIT = 64 << 20  # uncompressed bytes per shard before a new one starts
BATCH_CHARS = 1 << 18  # about a fifth of a second of tokenizing on one core
BATCH_DOCUMENTS = 4096
BATCHES_IN_FLIGHT_PER_WORKER = 4  # keeps workers busy while the parent compresses a shard
SIZE = re.compile(r"(\d+)\s*(b|kb?|mb?|gb?)?")
DOC_ID = struct.Struct("=q")  # int64 in native order, as streaming's int64 encoding writes it


def mds_columns(dtype: str) -> dict[str, str]:
    return {"input_ids": f"ndarray:{dtype}", "doc_id": "int64", "source": "str"}


def parse_size_limit(text: str) -> int:
    """`67108864`, `64mb`, `512kb`, `1gb` (powers of 1024, as streaming reads them) -> bytes."""
    match = SIZE.fullmatch(text.strip().lower())
    if not match:
        raise UsageError(f"--size-limit {text}: not a byte size (e.g. 67108864 or 64mb)")
    size = int(match[1]) * 1024 ** "bkmg".index((match[2] or "b")[0])
    if not 0 < size < 1 << 32:  # MDS stores sample offsets as uint32
        raise UsageError(f"--size-limit {text}: must be between 1 byte and 4gb")
    return size


# -- worker side: one tokenizer per process, set up once --------------------------------------------
_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_json: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    # Ctrl-C reaches the whole process group: the parent reports it and terminates the pool; a worker's own
    # KeyboardInterrupt would only print its traceback (one per worker) above the parent's line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = for_sharding(Tokenizer.from_str(tokenizer_json))
    _worker_dtype = np.dtype(dtype)


def ids_column(ids: list[int], dtype: np.dtype) -> bytes:
    """`ids` as the MDS data of an `ndarray:<dtype>` column: [ndim | shape width] [length] [values].

    That is streaming's NDArray layout for a fixed dtype and a free shape (one dimension here, its length
    stored in the narrowest of uint8/16/32/64). MDSWriter takes bytes as a column's encoded value, so the
    parent writes these without re-encoding each array in Python.
    """
    length = len(ids)
    width = 0 if length < 1 << 8 else 1 if length < 1 << 16 else 2 if length < 1 << 32 else 3
    header = bytes([1 << 2 | width]) + length.to_bytes(1 << width, sys.byteorder)
    return header + np.array(ids, dtype=dtype).tobytes()


def _encode(texts: list[str]) -> tuple[list[bytes], list[int]]:
    """Each text's `input_ids` column and token count (0: a text that encodes to nothing, no column)."""
    encodings = _worker_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    ids = [encoding.ids for encoding in encodings]
    return [ids_column(i, _worker_dtype) if i else b"" for i in ids], list(map(len, ids))


@contextmanager
def _worker_pool(workers: int, tokenizer: LoadedTokenizer):
    # Each worker encodes single-threaded: the processes are the parallelism. Setting the variable
    # in the workers also keeps tokenizers from warning when this process used its thread pool before.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        # Forked when this process is still small and torch-free (the CLI creates the pool before it
        # imports streaming, and so torch); spawned otherwise: in a caller that already runs torch's threads
        # (an inductor compile pool, a test runner) a forked worker was seen to die, and a pool that loses a
        # worker waits for its batch forever. Spawning costs ~0.2 s; workers import numpy and tokenizers.
        method = "spawn" if "torch" in sys.modules else "fork"
        pool = get_context(method).Pool(workers, _init_worker, (tokenizer.json_text, tokenizer.dtype))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


# -- parent side ---------------------------------------------------------------------------------------
@dataclass
class ShardStats:
    documents: int = 0
    tokens: int = 0
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> documents, tokens

    def add(self, source: str, tokens: int) -> None:
        self.documents += 1
        self.tokens += tokens
        counts = self.sources.setdefault(source, {"documents": 0, "tokens": 0})
        counts["documents"] += 1
        counts["tokens"] += tokens


def _batches(documents: Iterable[Document]) -> Iterator[list[Document]]:
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _Progress:
    """Documents, tokens and tokens/s on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", file=sys.stderr, dynamic_ncols=True)
        self.start = time.perf_counter()

    def update(self, documents: int, stats: ShardStats) -> None:
        if self.bar is not None:
            rate = stats.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{stats.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
            self.bar.update(documents)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_shards(
    documents: Iterable[Document],
    folder: Path,
    tokenizer: LoadedTokenizer,
    *,
    workers: int,
    size_limit: int,
    report: ReadReport,
    progress: bool,
) -> ShardStats:
    """Tokenize and write every document into `folder` (which must be empty)."""
    stats = ShardStats()
    bar = _Progress(progress)

    def write(writer, batch: list[Document], encoded) -> None:
        columns, lengths = encoded.get()
        for document, column, length in zip(batch, columns, lengths):
            if not length:  # a tokenizer whose normalizer deletes everything the text holds
                report.skip("no tokens", document.origin, document.line)
                continue
            doc_id = DOC_ID.pack(stats.documents)
            writer.write({"input_ids": column, "doc_id": doc_id, "source": document.source.encode()})
            stats.add(document.source, length)
        bar.update(len(batch), stats)

    columns = mds_columns(tokenizer.dtype)
    try:
        with _worker_pool(workers, tokenizer) as pool:
            from streaming import MDSWriter

            with MDSWriter(
                out=str(folder), columns=columns, compression="zstd", size_limit=size_limit
            ) as writer:
                in_flight: deque = deque()
                for batch in _batches(documents):
                    in_flight.append((batch, pool.apply_async(_encode, ([d.text for d in batch],))))
                    if len(in_flight) > BATCHES_IN_FLIGHT_PER_WORKER * workers:
                        write(writer, *in_flight.popleft())
                while in_flight:
                    write(writer, *in_flight.popleft())
    finally:
        bar.close()
    return stats


def shard(
    documents: Iterable[Document],
    output: Path,
    tokenizer: LoadedTokenizer,
    *,
    report: ReadReport,
    workers: int = 1,
    size_limit: int = DEFAULT_SIZE_LIMIT,
    overwrite: bool = False,
    progress: bool = False,
    inputs: list[str] | None = None,
    text_field: str = "text",
    allow_empty: bool = False,
) -> dict:
    """Write `output` (shards, tokenizer.json, modernbert_data.json) atomically; return the metadata.
    No documents at all is an error, unless `allow_empty` (one task's part of many may get no files)."""
    with staged_output(output, overwrite) as folder:
        stats = write_shards(
            documents,
            folder,
            tokenizer,
            workers=workers,
            size_limit=size_limit,
            report=report,
            progress=progress,
        )
        if stats.documents == 0 and not allow_empty:  # raised here, the staging folder is removed
            raise UsageError(
                f"--output {output}: no documents to write: no input record had text in field '{text_field}' "
                f"(see --text-field)"
            )
        # Here, once the workers are done: the data package imports torch, which makes the pool spawn workers
        # that each import it again.
        from modernbert_train.data.tokens import IDENTITY_RULE, tokenizer_identity

        shutil.copyfile(tokenizer.json_path, folder / "tokenizer.json")
        for companion in tokenizer.companion_files():
            shutil.copyfile(companion, folder / companion.name)
        shards = len(json.loads((folder / "index.json").read_text())["shards"])
        metadata = {
            "format_version": FORMAT_VERSION,
            "tokenizer": {
                "file": "tokenizer.json",
                "from": tokenizer.spec,
                "vocab_size": tokenizer.vocab_size,
                **tokenizer.special_token_ids,
                # What decides the ids (data.tokens.IDENTITY_PARTS), compared by training.
                "identity": tokenizer_identity(Path(tokenizer.json_path).read_text(encoding="utf-8")),
                "identity_rule": IDENTITY_RULE,
            },
            "columns": mds_columns(tokenizer.dtype),
            "dtype": tokenizer.dtype,
            "documents": stats.documents,
            "tokens": stats.tokens,
            "shards": shards,
            "sources": dict(sorted(stats.sources.items())),
            "inputs": inputs or [],
            "text_field": text_field,
            "read_problems": report.to_json(),
        }
        # Written last: its presence marks a finished folder even to a reader that ignores the rename.
        (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata
