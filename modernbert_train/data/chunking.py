"""Split a document into `[CLS] chunk [SEP]` pieces of at most max_seq_len tokens; never truncate."""

import numpy as np


def chunk_bounds(num_tokens: int, max_seq_len: int) -> list[tuple[int, int]]:
    """(start, end) of each consecutive chunk. All chunks but the last hold max_seq_len - 2 tokens,
    so they fill a packed row exactly; every token lands in exactly one chunk."""
    body = max_seq_len - 2
    return [(start, min(start + body, num_tokens)) for start in range(0, num_tokens, body)]


def wrap_chunk(body: np.ndarray, left: int, right: int) -> np.ndarray:
    """`[left] body [right]` as one int64 array (left/right: CLS/SEP ids, or IGNORE_INDEX for labels)."""
    out = np.empty(body.shape[0] + 2, dtype=np.int64)
    out[0] = left
    out[1:-1] = body
    out[-1] = right
    return out
