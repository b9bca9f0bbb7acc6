"""MLM masking: rates, the 80/10/10 split, specials untouched, reproducible per chunk; ratio schedules."""

import numpy as np
import pytest

from modernbert_train.data import IGNORE_INDEX, TokenizerInfo
from modernbert_train.data.masking import MaskingSchedule, chunk_rng, mask_tokens, random_non_special

INFO = TokenizerInfo(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=500, special_ids=(4, 250, 499))


def test_mask_rate_and_80_10_10_split():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 249, 200_000)
    input_ids, labels = mask_tokens(tokens, chunk_rng(1, 0, 7, 0), 0.3, INFO)
    selected = labels != IGNORE_INDEX
    assert abs(selected.mean() - 0.3) < 0.005
    assert np.array_equal(labels[selected], tokens[selected])
    replaced_by_mask = (input_ids == INFO.mask_id)[selected].mean()
    kept = (input_ids == tokens)[selected].mean()
    randomized = 1 - replaced_by_mask - kept
    assert abs(replaced_by_mask - 0.8) < 0.01
    # a random draw can land on the original token (1 in ~490), counted as kept here
    assert abs(kept - 0.1) < 0.01 and abs(randomized - 0.1) < 0.01
    assert np.array_equal(input_ids[~selected], tokens[~selected])


def test_eval_rate():
    tokens = np.random.default_rng(1).integers(5, 249, 100_000)
    _, labels = mask_tokens(tokens, chunk_rng(1, 0, 0, 0), 0.15, INFO)
    assert abs((labels != IGNORE_INDEX).mean() - 0.15) < 0.005


def test_special_tokens_are_never_masked_or_drawn():
    specials = np.array(INFO.special_ids)
    tokens = np.random.default_rng(2).choice(np.concatenate([specials, np.arange(5, 20)]), 50_000)
    input_ids, labels = mask_tokens(tokens, chunk_rng(3, 0, 0, 0), 0.5, INFO)
    is_special = np.isin(tokens, specials)
    assert (labels[is_special] == IGNORE_INDEX).all()
    assert np.array_equal(input_ids[is_special], tokens[is_special])
    draws = random_non_special(np.random.default_rng(4), 200_000, INFO)
    assert not np.isin(draws, specials).any()
    assert draws.min() >= 0 and draws.max() < INFO.vocab_size
    assert len(np.unique(draws)) == INFO.vocab_size - len(specials)  # every non-special id reachable


def test_reproducible_from_seed_epoch_and_chunk():
    tokens = np.arange(5, 1005) % 240 + 5
    first = mask_tokens(tokens, chunk_rng(9, 2, 11, 0), 0.3, INFO)
    again = mask_tokens(tokens, chunk_rng(9, 2, 11, 0), 0.3, INFO)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    for other in (
        chunk_rng(8, 2, 11, 0),
        chunk_rng(9, 3, 11, 0),
        chunk_rng(9, 2, 12, 0),
        chunk_rng(9, 2, 11, 1),
    ):
        assert not np.array_equal(first[1], mask_tokens(tokens, other, 0.3, INFO)[1])
    # a lower ratio masks a subset of the same draws: a schedule changes how many, not which order
    lower = mask_tokens(tokens, chunk_rng(9, 2, 11, 0), 0.15, INFO)[1] != IGNORE_INDEX
    assert (lower <= (first[1] != IGNORE_INDEX)).all() and 0 < lower.sum() < (first[1] != IGNORE_INDEX).sum()


def test_masking_schedules():
    assert MaskingSchedule((0.3,)).rate(10**9) == 0.3
    linear = MaskingSchedule((0.3, 0.1), (100, 200), "linear")
    assert [linear.rate(k) for k in (0, 100, 150, 200, 500)] == pytest.approx([0.3, 0.3, 0.2, 0.1, 0.1])
    step = MaskingSchedule((0.3, 0.2, 0.15), (10, 20), "step")
    assert [step.rate(k) for k in (0, 9, 10, 19, 20, 99)] == [0.3, 0.3, 0.2, 0.2, 0.15, 0.15]
    assert MaskingSchedule((0.3, 0.15), (50, 50), "linear").rate(50) == 0.3  # a ramp of no length: a step
    with pytest.raises(ValueError, match="every ratio must be in"):
        MaskingSchedule((0.3, 1.5), (0, 10), "linear")
    with pytest.raises(ValueError, match="1 value"):
        MaskingSchedule((0.3,), (10,), "step")
    with pytest.raises(ValueError, match="ascending"):
        MaskingSchedule((0.3, 0.2, 0.1), (20, 10), "step")


def test_tokenizer_info_rejects_ids_outside_vocab():
    with pytest.raises(ValueError, match="mask_id=600 is outside the vocabulary"):
        TokenizerInfo(pad_id=0, cls_id=1, sep_id=2, mask_id=600, vocab_size=500)
