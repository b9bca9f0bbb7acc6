"""Optimization: StableAdamW with weight-decay param groups, and learning-rate schedules as pure math.

Imports no Composer, model or data code; the Composer schedulers live in `modernbert_train.train.schedulers`.
"""

from modernbert_train.optim.param_groups import (
    NO_DECAY_CATEGORIES,
    param_groups,
    parse_no_decay,
    split_by_weight_decay,
)
from modernbert_train.optim.schedules import (
    DECAY_SHAPES,
    decay_curve,
    decay_multiplier,
    warmup_multiplier,
    wsd_multiplier,
)
from modernbert_train.optim.stable_adamw import StableAdamW, build_optimizer

__all__ = [
    "DECAY_SHAPES",
    "NO_DECAY_CATEGORIES",
    "StableAdamW",
    "build_optimizer",
    "decay_curve",
    "decay_multiplier",
    "param_groups",
    "parse_no_decay",
    "split_by_weight_decay",
    "warmup_multiplier",
    "wsd_multiplier",
]
