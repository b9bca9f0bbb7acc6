"""Batch-size warmup: rows per global batch as a pure function of the global batch index.

The batch grows linearly in tokens seen (row slots, so it does not depend on the data) from
`start_rows` to `global_rows` over `warmup_tokens`, rounded down to a multiple of
micro_batch_size * world_size so every rank gets whole micro-batches. Every worker, rank and
resumed run computes the same sizes from the same arguments.

A resumed run whose earlier batches followed other sizes (another global batch size, micro-batch
size or world size) places the ramp at the rows it really trained: `continue_from(batch, rows)`
answers from that batch on, as if the slots before it had come from this schedule's own sizes.
With the same arguments the sizes are the straight run's.
"""

import bisect
from dataclasses import dataclass, field


@dataclass
class BatchSizeSchedule:
    global_rows: int
    max_seq_len: int
    micro_batch_size: int = 1
    world_size: int = 1
    start_rows: int | None = None  # None: no warmup, every batch is global_rows
    warmup_tokens: int = 0
    # Set by continue_from: sizes from batch _first on, _rows_before_first rows having been trained before it.
    _first: int = field(default=0, init=False, repr=False)
    _rows_before_first: int = field(default=0, init=False, repr=False)
    _sizes: list[int] = field(default_factory=list, init=False, repr=False)  # of batches _first.. so far
    _before: list[int] = field(default_factory=list, init=False, repr=False)  # rows before each, from _first
    _slots: int = field(default=0, init=False, repr=False)  # row slots before the next size to compute

    def __post_init__(self):
        if self.global_rows < 1 or self.global_rows % self.world_size:
            raise ValueError(
                f"global_batch_size={self.global_rows} must be a positive multiple of "
                f"world_size={self.world_size}"
            )
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.start_rows is not None:
            if not 1 <= self.start_rows <= self.global_rows:
                raise ValueError(
                    f"batch_size_warmup start={self.start_rows} must be in [1, global_batch_size="
                    f"{self.global_rows}]"
                )
            if self.warmup_tokens < 0:
                raise ValueError(f"batch_size_warmup tokens must be >= 0, got {self.warmup_tokens}")
        self.continue_from(0, 0)

    def start_below_a_micro_batch(self) -> str | None:
        """Why the warmup cannot start where the recipe says (its start is below one micro-batch on every
        rank, so the batch starts at that instead), or None. The caller decides how loud: a run that starts
        anew refuses it, a resume (which cannot change the start) goes on with a warning."""
        if not self._warming_up or self.start_rows >= self.increment:
            return None
        return (
            f"batch_size_warmup start={self.start_rows} is below one micro-batch on every rank "
            f"({self.world_size} rank(s) x {self.micro_batch_size} rows = {self.increment}), where the batch "
            f"starts instead: set start to {self.increment} or more, or lower device_train_microbatch_size"
        )

    @property
    def increment(self) -> int:
        return min(self.micro_batch_size * self.world_size, self.global_rows)

    def continue_from(self, batch_index: int, rows_trained: int) -> None:
        """Answer from global batch `batch_index` on, `rows_trained` rows (all ranks) having been trained
        before it; batches before it are no longer asked about."""
        if batch_index < 0 or rows_trained < 0:
            raise ValueError(f"continue_from({batch_index}, {rows_trained}): expected non-negative counts")
        self._first, self._rows_before_first = batch_index, rows_trained
        self._sizes, self._before, self._slots = [], [], rows_trained * self.max_seq_len

    def rows(self, batch_index: int) -> int:
        """Rows (sequences of max_seq_len) in global batch `batch_index`, all ranks together."""
        position = self._position(batch_index)
        if not self._warming_up:
            return self.global_rows
        self._extend(position)
        return self._sizes[position] if position < len(self._sizes) else self.global_rows

    def rows_before(self, batch_index: int) -> int:
        """Rows (all ranks) trained before global batch `batch_index`."""
        position = self._position(batch_index)
        if self._warming_up:
            self._extend(position)
            if position < len(self._sizes):
                return self._rows_before_first + self._before[position]
        computed = len(self._sizes)  # past the warmup: every batch after these holds global_rows
        done = self._before[-1] + self._sizes[-1] if computed else 0
        return self._rows_before_first + done + (position - computed) * self.global_rows

    def batches_until(self, rows: int) -> int:
        """The index of the first global batch that starts with at least `rows` rows already trained."""
        if rows <= self._rows_before_first:
            return self._first
        wanted = rows - self._rows_before_first
        position = 0
        if self._warming_up:
            while self._slots < self.warmup_tokens and (not self._sizes or self._total() < wanted):
                self._extend(len(self._sizes))
            position = bisect.bisect_left(self._before, wanted)
            if position < len(self._sizes):
                return self._first + position
        left = wanted - self._total()
        return self._first + len(self._sizes) + -(-left // self.global_rows)

    def rank_rows(self, batch_index: int) -> int:
        """Rows one rank contributes to global batch `batch_index`."""
        return self.rows(batch_index) // self.world_size

    @property
    def _warming_up(self) -> bool:
        return self.start_rows is not None and bool(self.warmup_tokens)

    def _position(self, batch_index: int) -> int:
        if batch_index < self._first:
            raise ValueError(
                f"batch size schedule: batch {batch_index} is before batch {self._first}, where it continues"
            )
        return batch_index - self._first

    def _total(self) -> int:
        return self._before[-1] + self._sizes[-1] if self._sizes else 0

    def _extend(self, position: int) -> None:
        """Compute the sizes up to `position` (or the warmup's end, when it comes first)."""
        while len(self._sizes) <= position and self._slots < self.warmup_tokens:
            self._before.append(self._total())
            self._sizes.append(self._rows_after(self._slots))
            self._slots += self._sizes[-1] * self.max_seq_len

    def _rows_after(self, slots_seen: int) -> int:
        fraction = min(slots_seen / self.warmup_tokens, 1.0)
        raw = self.start_rows + (self.global_rows - self.start_rows) * fraction
        rounded = int(raw) // self.increment * self.increment
        return min(max(rounded, self.increment), self.global_rows)
