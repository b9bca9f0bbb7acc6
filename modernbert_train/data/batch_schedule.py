"""Batch-size warmup: rows per global batch as a pure function of the global batch index.

The batch grows linearly in tokens seen (row slots, so it does not depend on the data) from
`start_rows` to `global_rows` over `warmup_tokens`, rounded down to a multiple of
micro_batch_size * world_size so every rank gets whole micro-batches. Every worker, rank and
resumed run computes the same sizes from the same arguments.
"""

from dataclasses import dataclass, field


@dataclass
class BatchSizeSchedule:
    global_rows: int
    max_seq_len: int
    micro_batch_size: int = 1
    world_size: int = 1
    start_rows: int | None = None  # None: no warmup, every batch is global_rows
    warmup_tokens: int = 0
    _sizes: list[int] = field(default_factory=list, repr=False)  # sizes of batches 0.. computed so far
    _slots: int = field(default=0, repr=False)  # row slots in those batches

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

    @property
    def increment(self) -> int:
        return min(self.micro_batch_size * self.world_size, self.global_rows)

    def rows(self, batch_index: int) -> int:
        """Rows (sequences of max_seq_len) in global batch `batch_index`, all ranks together."""
        if self.start_rows is None or not self.warmup_tokens:
            return self.global_rows
        while len(self._sizes) <= batch_index and self._slots < self.warmup_tokens:
            self._sizes.append(self._rows_after(self._slots))
            self._slots += self._sizes[-1] * self.max_seq_len
        return self._sizes[batch_index] if batch_index < len(self._sizes) else self.global_rows

    def batches_until(self, rows: int) -> int:
        """The index of the first global batch that starts with at least `rows` rows already trained."""
        seen = batch = 0
        while seen < rows:
            size = self.rows(batch)
            if batch >= len(self._sizes):  # past the warmup: every batch holds global_rows
                return batch + -(-(rows - seen) // self.global_rows)
            seen += size
            batch += 1
        return batch

    def rank_rows(self, batch_index: int) -> int:
        """Rows one rank contributes to global batch `batch_index`."""
        return self.rows(batch_index) // self.world_size

    def _rows_after(self, slots_seen: int) -> int:
        fraction = min(slots_seen / self.warmup_tokens, 1.0)
        raw = self.start_rows + (self.global_rows - self.start_rows) * fraction
        rounded = int(raw) // self.increment * self.increment
        return min(max(rounded, self.increment), self.global_rows)
