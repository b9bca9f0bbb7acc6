"""Learning-rate multipliers as pure functions of training progress.

Every time argument (`t`, `warmup`, `decay_start`, `total`) is a count in one common unit of the caller's
choice (tokens, batches, samples); the result multiplies the peak learning rate.

Warmup-stable-decay (WSD): a linear ramp from `warmup_start` to 1 over `[0, warmup]`, 1 until
`decay_start`, then a decay of the chosen shape to `final_multiplier` at `total`, held afterwards.
A warmup followed by a plain linear or cosine decay is the case `decay_start == warmup`.
"""

import math

DECAY_SHAPES = ("linear", "1-sqrt", "cosine")


def decay_curve(progress: float, shape: str) -> float:
    """How much of the peak is left `progress` (0..1) of the way through a decay: 1 at 0, 0 at 1."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - progress
    if shape == "1-sqrt":  # Hägele et al. 2024: the short cooldown that matches cosine
        return 1.0 - math.sqrt(progress)
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"decay_shape={shape!r}: choose from {', '.join(DECAY_SHAPES)}")


def warmup_multiplier(t: float, *, warmup: float, warmup_start: float = 0.0) -> float:
    """Linear from `warmup_start` at t=0 to 1 at t=`warmup`; 1 from then on (and always, for no warmup)."""
    if t >= warmup:
        return 1.0
    return warmup_start + (1.0 - warmup_start) * max(t, 0.0) / warmup


def decay_multiplier(
    t: float, *, decay_start: float, total: float, decay_shape: str = "linear", final_multiplier: float = 0.0
) -> float:
    """1 until `decay_start`, then `decay_shape` down to `final_multiplier` at `total`, held afterwards.

    A zero-length decay (`decay_start == total`) means no decay: the multiplier stays 1.
    """
    if total <= decay_start:
        return 1.0
    progress = (t - decay_start) / (total - decay_start)
    return final_multiplier + (1.0 - final_multiplier) * decay_curve(progress, decay_shape)


def wsd_multiplier(
    t: float,
    *,
    warmup: float,
    decay_start: float,
    total: float,
    decay_shape: str = "1-sqrt",
    final_multiplier: float = 0.0,
    warmup_start: float = 0.0,
) -> float:
    """The warmup-stable-decay multiplier at `t` (see the module docstring)."""
    if not 0 <= warmup <= decay_start <= total:
        raise ValueError(
            f"wsd: need 0 <= warmup <= decay_start <= total, got {warmup=}, {decay_start=}, {total=}"
        )
    if not (0 <= final_multiplier <= 1 and 0 <= warmup_start <= 1):
        raise ValueError(f"wsd: {final_multiplier=} and {warmup_start=} must lie in [0, 1]")
    # Until warmup ends the ramp is the lower one, afterwards the decay: the lower of the two is the WSD.
    return min(
        warmup_multiplier(t, warmup=warmup, warmup_start=warmup_start),
        decay_multiplier(
            t,
            decay_start=decay_start,
            total=total,
            decay_shape=decay_shape,
            final_multiplier=final_multiplier,
        ),
    )
