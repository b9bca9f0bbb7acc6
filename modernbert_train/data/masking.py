"""BERT-style MLM masking of a document's chunk, vectorized, at a ratio that may follow a schedule.

A chunk is masked when its batch is emitted, at the ratio the `MaskingSchedule` gives the batch's
global index (or the rows trained before it), with a generator keyed by which piece of which document
it is (`chunk_rng`): the masks depend on no worker count, topology or resume, and the ratio can change
over the run (Ettin and mmBERT lower it through the decay phase).
"""

import bisect
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from modernbert_train.data.tokens import TokenizerInfo

IGNORE_INDEX = -100
SCHEDULE_SHAPES = ("constant", "linear", "step")
SCHEDULE_UNITS = ("batch", "row")


@dataclass(frozen=True)
class MaskingSchedule:
    """The masking ratio of a batch, a pure function of its position: with unit "batch" its global index,
    with unit "row" the rows (samples, all ranks) trained before it, which a run resumed with another batch
    size still counts right (times in samples or tokens).

    constant: `values=(p,)`. linear: `values=(start, end)`, `milestones=(first, last)`: `start` up to
    position `first`, `end` from position `last`, linear in between. step: `values[i]` from position
    `milestones[i - 1]` on (one value more than milestones)."""

    values: tuple[float, ...]
    milestones: tuple[int, ...] = ()
    shape: str = "constant"
    unit: str = "batch"

    def __post_init__(self):
        if self.shape not in SCHEDULE_SHAPES:
            raise ValueError(f"masking schedule: shape must be one of {', '.join(SCHEDULE_SHAPES)}")
        if self.unit not in SCHEDULE_UNITS:
            raise ValueError(f"masking schedule: unit must be one of {', '.join(SCHEDULE_UNITS)}")
        wanted = {"constant": (1, 0), "linear": (2, 2)}.get(self.shape, (len(self.milestones) + 1, None))
        if len(self.values) != wanted[0] or (wanted[1] is not None and len(self.milestones) != wanted[1]):
            raise ValueError(
                f"masking schedule ({self.shape}): got {len(self.values)} value(s) and "
                f"{len(self.milestones)} milestone(s)"
            )
        for value in self.values:
            if not 0.0 < value < 1.0:
                raise ValueError(f"masking schedule: every ratio must be in (0, 1), got {value}")
        if list(self.milestones) != sorted(self.milestones) or any(m < 0 for m in self.milestones):
            raise ValueError(
                f"masking schedule: milestones must be ascending {self.unit} positions, got {self.milestones}"
            )

    def rate(self, position: int) -> float:
        """The ratio at `position`: a global batch index, or rows trained before the batch (see `unit`)."""
        if self.shape == "constant":
            return self.values[0]
        if self.shape == "step":
            return self.values[bisect.bisect_right(self.milestones, position)]
        (start, end), (first, last) = self.values, self.milestones
        if position <= first:
            return start
        if position >= last:
            return end
        return start + (end - start) * (position - first) / (last - first)


def chunk_rng(seed: int, epoch: int, sample_id: int, chunk_index: int) -> np.random.Generator:
    """The generator that masks one chunk: depends only on which piece of which document it is, never on
    which worker reads it or when, so masks survive any worker count and any resume."""
    return np.random.default_rng([seed, epoch, sample_id, chunk_index])


def mask_tokens(
    tokens: np.ndarray, rng: np.random.Generator, probability: float, info: TokenizerInfo
) -> tuple[np.ndarray, np.ndarray]:
    """Mask `probability` of the non-special tokens (any shape; padding and [CLS]/[SEP] are special):
    80% become [MASK], 10% a random non-special token, 10% stay. Returns (input_ids, labels) as int64;
    labels are the original token where masked, IGNORE_INDEX elsewhere."""
    tokens = tokens.astype(np.int64)
    draw = rng.random(tokens.shape)
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
