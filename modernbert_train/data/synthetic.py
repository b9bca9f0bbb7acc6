"""Synthetic MDS folders in the layout `modernbert-data shard` writes, for tests and benchmarks."""

from pathlib import Path

import numpy as np
from streaming import MDSWriter

MDS_COLUMNS = {"input_ids": "ndarray:uint16", "doc_id": "int64", "source": "str"}


def document_lengths(
    num_docs: int, rng: np.random.Generator, median: int = 300, sigma: float = 1.2
) -> np.ndarray:
    """Log-normal lengths like web text: many short documents, a long tail past any max_seq_len."""
    return np.maximum(1, rng.lognormal(np.log(median), sigma, num_docs).astype(np.int64))


def write_synthetic_mds(
    out: str | Path,
    num_docs: int,
    *,
    seed: int = 0,
    source: str = "synthetic",
    first_doc_id: int = 0,
    token_range: tuple[int, int] = (5, 1000),
    median: int = 300,
    size_limit: int = 1 << 16,
) -> list[np.ndarray]:
    """Write `num_docs` random documents (no special tokens) and return their token arrays.
    A small `size_limit` makes several shards, so shard-aware shuffling has something to do."""
    rng = np.random.default_rng(seed)
    documents = [
        rng.integers(token_range[0], token_range[1], length).astype(np.uint16)
        for length in document_lengths(num_docs, rng, median)
    ]
    with MDSWriter(out=str(out), columns=MDS_COLUMNS, compression="zstd", size_limit=size_limit) as writer:
        for i, tokens in enumerate(documents):
            writer.write({"input_ids": tokens, "doc_id": first_doc_id + i, "source": source})
    return documents
