"""Composer learning-rate schedulers: warmup-stable-decay and the phases it splits into.

Each scheduler is a Composer `ComposerScheduler`: `scheduler(state, ssr=1.0)` returns the multiplier for
the optimizer's initial lr at `state.timestamp`. Durations are Composer time strings in tokens ('3e9tok'),
batches ('3000ba'), samples ('sp'), epochs ('ep', counted as batches) or fractions of `max_duration`
('0.1dur', counted in max_duration's unit). As Composer's own schedulers do, `ssr` stretches the decay and
`t_max` but not the warmup ('dur' stretches with max_duration, which the Trainer scales).

A run that loads weights and resets time (context extension, the final decay) gets its own scheduler:
  pretraining, stable only:  wsd, t_warmup='3e9tok', t_decay='0tok'   (or constant, t_warmup='3e9tok')
  decay-only phase:          wsd, t_warmup='0ba', t_decay='1dur'
Composer's 'tok' counts what the train DataSpec's `get_num_tokens_in_batch` reports; its default counts
every position of `input_ids`, padding included.
"""

import inspect
from collections.abc import Mapping
from typing import Any

from composer.core import State, Time, Timestamp, TimeUnit

from modernbert_train.optim.schedules import DECAY_SHAPES, decay_multiplier, warmup_multiplier

_UNITS = (TimeUnit.TOKEN, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.EPOCH, TimeUnit.DURATION)
_EXAMPLES = "e.g. '3000ba', '2e9tok' or '0.1dur'"


def parse_duration(value: Any, arg: str) -> Time:
    """A non-negative Composer `Time` from a string such as '3e9tok'; a one-line error naming `arg` else."""
    if isinstance(value, Time):
        time = value
    elif isinstance(value, str):
        try:
            time = Time.from_timestring(value.strip())
        except (ValueError, TypeError) as error:
            raise ValueError(f"scheduler {arg}={value!r}: not a duration ({error}); {_EXAMPLES}") from None
    else:
        raise ValueError(f"scheduler {arg}={value!r}: expected a duration string with a unit, {_EXAMPLES}")
    if time.unit not in _UNITS:
        units = ", ".join(repr(unit.value) for unit in _UNITS)
        raise ValueError(f"scheduler {arg}={value!r}: unit {time.unit.value!r} not allowed; use {units}")
    if time.value < 0 or (time.unit == TimeUnit.DURATION and time.value > 1):
        raise ValueError(f"scheduler {arg}={value!r}: must be >= 0 (and at most '1dur')")
    return time


def _fraction(value: Any, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"scheduler {arg}={value!r}: expected a number in [0, 1]")
    return float(value)


def _decay_shape(value: Any) -> str:
    if value not in DECAY_SHAPES:
        raise ValueError(f"scheduler decay_shape={value!r}: choose from {', '.join(DECAY_SHAPES)}")
    return value


def _to_count(time: Time, state: State, ssr: float = 1.0) -> Time[int]:
    """`time` in a unit the timestamp counts: 'dur' in max_duration's unit, epochs in batches."""
    max_duration = state.max_duration
    if max_duration is None:
        raise ValueError("scheduler: the Trainer needs max_duration to place the schedule")
    if time.unit == TimeUnit.DURATION and max_duration.unit != TimeUnit.EPOCH:
        return Time(int(time.value * max_duration.value), max_duration.unit)
    if time.unit not in (TimeUnit.DURATION, TimeUnit.EPOCH):
        return Time(int(time.value * ssr), time.unit)
    if state.dataloader_len is None:
        raise ValueError(f"scheduler: cannot count {time} in batches; the train dataloader has no length")
    if time.unit == TimeUnit.DURATION:  # max_duration in epochs, already stretched by the Trainer
        epochs, ssr = time.value * max_duration.value, 1.0
    else:
        epochs = time.value
    return Time(int(epochs * int(state.dataloader_len) * ssr), TimeUnit.BATCH)


def _now(state: State, unit: TimeUnit) -> int:
    now = state.timestamp.get(unit).value
    if unit == TimeUnit.TOKEN and now == 0 and state.timestamp.batch.value > 0:
        # Otherwise a token-based warmup would silently hold the lr at its start value forever.
        raise RuntimeError(
            "scheduler: durations are in tokens but the train DataSpec reports 0 tokens per batch"
        )
    return now


def _warmup_then_decay(
    state: State,
    warmup: Time[int],
    decay_start: int,
    t_max: Time[int],
    decay_shape: str,
    alpha_f: float,
    warmup_start: float,
) -> float:
    # The ramp is below 1 only before warmup ends, the decay only after decay_start, and warmup ends first
    # (checked where the units compare), so the schedule is the lower of the two. Each reads its own clock,
    # which lets a warmup in tokens precede a decay counted in batches.
    return min(
        warmup_multiplier(_now(state, warmup.unit), warmup=warmup.value, warmup_start=warmup_start),
        decay_multiplier(
            _now(state, t_max.unit),
            decay_start=decay_start,
            total=t_max.value,
            decay_shape=decay_shape,
            final_multiplier=alpha_f,
        ),
    )


class WarmupStableDecayScheduler:
    """Linear warmup over `t_warmup`, constant, then the last `t_decay` before `t_max` decays to `alpha_f`.

    `t_decay='0tok'` (any unit) keeps the lr constant to the end; `t_warmup='0ba', t_decay='1dur'` decays
    over the whole run. The lr holds at `alpha_f` after `t_max`.
    """

    def __init__(
        self,
        t_warmup: str | Time = "0ba",
        t_decay: str | Time = "0.1dur",
        decay_shape: str = "1-sqrt",
        alpha_f: float = 0.0,
        t_max: str | Time = "1dur",
        warmup_start: float = 0.0,
    ):
        self.t_warmup = parse_duration(t_warmup, "t_warmup")
        self.t_decay = parse_duration(t_decay, "t_decay")
        self.decay_shape = _decay_shape(decay_shape)
        self.alpha_f = _fraction(alpha_f, "alpha_f")
        self.t_max = parse_duration(t_max, "t_max")
        self.warmup_start = _fraction(warmup_start, "warmup_start")

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        warmup = _to_count(self.t_warmup, state)
        decay = _to_count(self.t_decay, state, ssr)
        t_max = _to_count(self.t_max, state, ssr)
        if decay.value > 0 and decay.unit != t_max.unit:
            raise ValueError(
                f"scheduler t_decay={self.t_decay} is in {decay.unit.value} but t_max={self.t_max} in "
                f"{t_max.unit.value}; give t_decay the unit of max_duration or 'dur'"
            )
        decay_start = t_max.value - decay.value
        if decay_start < 0:
            raise ValueError(f"scheduler t_decay={self.t_decay} is longer than t_max={self.t_max} ({t_max})")
        if warmup.unit == t_max.unit and warmup.value > decay_start:
            raise ValueError(
                f"scheduler t_warmup={self.t_warmup} ({warmup}) runs past the decay start at "
                f"{decay_start}{t_max.unit.value} (t_decay={self.t_decay}, t_max={self.t_max})"
            )
        return _warmup_then_decay(
            state, warmup, decay_start, t_max, self.decay_shape, self.alpha_f, self.warmup_start
        )


class WarmupDecayScheduler:
    """Linear warmup over `t_warmup`, then a `decay_shape` decay to `alpha_f` at `t_max` (no stable phase)."""

    def __init__(
        self,
        t_warmup: str | Time = "0ba",
        decay_shape: str = "cosine",
        alpha_f: float = 0.0,
        t_max: str | Time = "1dur",
        warmup_start: float = 0.0,
    ):
        self.t_warmup = parse_duration(t_warmup, "t_warmup")
        self.decay_shape = _decay_shape(decay_shape)
        self.alpha_f = _fraction(alpha_f, "alpha_f")
        self.t_max = parse_duration(t_max, "t_max")
        self.warmup_start = _fraction(warmup_start, "warmup_start")

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        warmup = _to_count(self.t_warmup, state)
        t_max = _to_count(self.t_max, state, ssr)
        if warmup.value > 0 and warmup.unit != t_max.unit:
            raise ValueError(
                f"scheduler t_warmup={self.t_warmup} is in {warmup.unit.value} but t_max={self.t_max} in "
                f"{t_max.unit.value}; the decay starts where warmup ends, so give them one unit"
            )
        if warmup.value > t_max.value:
            raise ValueError(
                f"scheduler t_warmup={self.t_warmup} is longer than t_max={self.t_max} ({t_max})"
            )
        return _warmup_then_decay(
            state, warmup, warmup.value, t_max, self.decay_shape, self.alpha_f, self.warmup_start
        )


class WarmupConstantScheduler:
    """Linear warmup over `t_warmup`, then the peak lr to the end: the stable phase of a WSD run."""

    def __init__(self, t_warmup: str | Time = "0ba", warmup_start: float = 0.0):
        self.t_warmup = parse_duration(t_warmup, "t_warmup")
        self.warmup_start = _fraction(warmup_start, "warmup_start")

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        warmup = _to_count(self.t_warmup, state)
        return warmup_multiplier(
            _now(state, warmup.unit), warmup=warmup.value, warmup_start=self.warmup_start
        )


# name -> (class, arguments the name fixes)
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "wsd": (WarmupStableDecayScheduler, {}),
    "warmup_stable_decay": (WarmupStableDecayScheduler, {}),
    "constant": (WarmupConstantScheduler, {}),
    "linear": (WarmupDecayScheduler, {"decay_shape": "linear"}),
    "cosine": (WarmupDecayScheduler, {"decay_shape": "cosine"}),
}


def build_scheduler(cfg: Mapping[str, Any]):
    """The scheduler a YAML mapping names, e.g. {name: wsd, t_warmup: 3e9tok, t_decay: 0.1dur}.

    Keys are the named class's arguments; a null value means that argument's default.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"scheduler: expected a mapping with a 'name', got {cfg!r}")
    names = ", ".join(SCHEDULERS)
    if "name" not in cfg:
        raise ValueError(f"scheduler: missing key 'name'; choose from {names}")
    name = cfg["name"]
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler.name={name!r}: unknown; choose from {names}")
    scheduler_class, fixed = SCHEDULERS[name]
    allowed = [arg for arg in inspect.signature(scheduler_class).parameters if arg not in fixed]
    kwargs = {key: value for key, value in cfg.items() if key != "name" and value is not None}
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"scheduler.{key}: unknown key for name {name!r}; allowed: {', '.join(allowed)}")
    return scheduler_class(**kwargs, **fixed)


class _CheckpointClock:
    """What a scheduler reads of Composer's State, for a checkpoint's clock without a Trainer (no dataloader:
    a 'dur' counted in epochs cannot be placed)."""

    def __init__(self, clock: Mapping[str, int], max_duration: str):
        counters = ("epoch", "batch", "sample", "token")
        self.timestamp = Timestamp(**{counter: int(clock[counter]) for counter in counters})
        self.max_duration = Time.from_timestring(max_duration)
        self.dataloader_len = None


def multiplier_at(cfg: Mapping[str, Any], max_duration: str, clock: Mapping[str, int]) -> float | None:
    """The lr multiplier the scheduler `cfg` (a recipe's `scheduler` mapping) gives at a checkpoint's `clock`
    ({"batch": 600, "token": ..., ...}) under `max_duration`: the first one a resumed run's scheduler decides.
    Composer steps schedulers at a batch's end, before advancing the clock, so batch 601 trains at the lr the
    checkpoint's optimizer kept (the multiplier at 599) and batch 602 at this one. None where it cannot be
    told without the Trainer (a bad scheduler, a 'dur' counted in epochs): the Trainer then reports it."""
    try:
        scheduler = build_scheduler({key: value for key, value in cfg.items() if value is not None})
        return float(scheduler(_CheckpointClock(clock, max_duration)))
    except (ValueError, TypeError, KeyError, RuntimeError):
        return None
