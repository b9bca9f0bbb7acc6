"""BERT-style MLM masking of one document, vectorized and reproducible from its own seed."""

from functools import lru_cache

import numpy as np

from modernbert_train.data.tokens import TokenizerInfo

IGNORE_INDEX = -100


def document_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The generator that masks one document: depends only on who the document is, never on
    which worker reads it or when, so masks survive any worker count and any resume."""
    return np.random.default_rng([seed, epoch, sample_id])


def mask_tokens(
    tokens: np.ndarray, rng: np.random.Generator, probability: float, info: TokenizerInfo
) -> tuple[np.ndarray, np.ndarray]:
    """Mask `probability` of the non-special tokens: 80% become [MASK], 10% a random non-special
    token, 10% stay. Returns (input_ids, labels) as int64; labels are the original token where
    masked, IGNORE_INDEX elsewhere."""
    tokens = tokens.astype(np.int64)
    draw = rng.random(tokens.shape[0])
    selected = (draw < probability) & ~special_table(info)[tokens]
    labels = np.where(selected, tokens, IGNORE_INDEX)

    # Reuse the same uniform draw to pick the action: draw / probability is uniform on [0, 1)
    # among the selected tokens, so no second pass over the document is needed.
    action = draw / probability
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    input_ids = np.where(to_mask, info.mask_id, tokens)
    n_random = int(to_random.sum())
    if n_random:
        input_ids[to_random] = random_non_special(rng, n_random, info)
    return input_ids, labels


@lru_cache(maxsize=8)
def special_table(info: TokenizerInfo) -> np.ndarray:
    """is_special[token_id] as a lookup table: one gather per document instead of a set test."""
    table = np.zeros(info.vocab_size, dtype=bool)
    table[list(info.special_ids)] = True
    return table


def random_non_special(rng: np.random.Generator, n: int, info: TokenizerInfo) -> np.ndarray:
    """n ids drawn uniformly from the vocabulary without the special ids."""
    specials = np.asarray(info.special_ids, dtype=np.int64)
    draws = rng.integers(0, info.vocab_size - len(specials), n)
    # Shift each draw past the specials at or below it: specials[i] - i counts the non-special
    # ids below the i-th special, so searchsorted finds how many specials to skip.
    return draws + np.searchsorted(specials - np.arange(len(specials)), draws, side="right")
