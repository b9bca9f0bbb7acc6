"""What went wrong while reading the inputs: skipped records, replaced bytes, unreadable files.

Readers keep going past bad records and files; this collects what they passed over so the run can end
with a summary (by file and line) and write the same facts into `modernbert_data.json`.
"""

from collections import Counter, defaultdict

EXAMPLES_PER_KIND = 10  # locations kept per kind of problem; the counts are always complete
EXAMPLES_PRINTED = 5


def location(origin: str, line: int | None) -> str:
    """`file:line` (a line of a jsonl file, a row of a parquet file) or just `file` for a whole file."""
    return origin if line is None else f"{origin}:{line}"


class ReadReport:
    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()  # reason -> records skipped
        self.skipped_by_file: Counter[str] = Counter()
        self.examples: defaultdict[str, list[str]] = defaultdict(list)  # reason -> first locations
        self.replaced_characters = 0
        self.replaced_records = 0
        self.binary_files = 0
        self.duplicate_files = 0  # input files reached a second time (given twice, or via a folder or link)
        self.unreadable: list[dict] = []  # {"file", "error", "documents_read"}

    def _example(self, kind: str, where: str) -> None:
        if len(self.examples[kind]) < EXAMPLES_PER_KIND:
            self.examples[kind].append(where)

    def skip(self, reason: str, origin: str, line: int | None, count: int = 1) -> None:
        self.skipped[reason] += count
        self.skipped_by_file[origin] += count
        self._example(reason, location(origin, line))

    def replaced(self, characters: int, origin: str, line: int | None) -> None:
        self.replaced_characters += characters
        self.replaced_records += 1
        self._example("undecodable bytes", location(origin, line))

    def binary(self, origin: str) -> None:
        self.binary_files += 1
        self._example("binary file", origin)

    def duplicate(self, origin: str) -> None:
        self.duplicate_files += 1
        self._example("duplicate input", origin)

    def unreadable_file(self, origin: str, error: BaseException, documents_read: int) -> None:
        message = " ".join(f"{type(error).__name__}: {error}".split())
        self.unreadable.append({"file": origin, "error": message, "documents_read": documents_read})

    def to_json(self) -> dict:
        return {
            "skipped_records": dict(sorted(self.skipped.items())),
            "skipped_by_file": dict(sorted(self.skipped_by_file.items())),
            "replaced_characters": self.replaced_characters,
            "records_with_replaced_characters": self.replaced_records,
            "binary_files_skipped": self.binary_files,
            "duplicate_files_skipped": self.duplicate_files,
            "unreadable_files": self.unreadable,
            "examples": dict(sorted(self.examples.items())),
        }

    def _where(self, kind: str, total: int) -> str:
        shown = self.examples[kind][:EXAMPLES_PRINTED]
        return ", ".join(shown) + (", ..." if total > len(shown) else "")

    def summary_lines(self) -> list[str]:
        """Human-readable lines for the end of a run; empty when nothing went wrong."""
        lines = []
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"skipped {count} record(s): {reason} (at {self._where(reason, count)})")
        if self.replaced_records:
            where = self._where("undecodable bytes", self.replaced_records)
            lines.append(
                f"replaced {self.replaced_characters} undecodable byte sequence(s) with U+FFFD in "
                f"{self.replaced_records} record(s) (at {where})"
            )
        if self.binary_files:
            where = self._where("binary file", self.binary_files)
            lines.append(f"skipped {self.binary_files} binary file(s) ({where})")
        if self.duplicate_files:
            where = self._where("duplicate input", self.duplicate_files)
            lines.append(f"read {self.duplicate_files} file(s) reached twice by --input only once ({where})")
        for failure in self.unreadable:
            lines.append(
                f"error: could not read {failure['file']}: {failure['error']} "
                f"({failure['documents_read']} document(s) read before the error were kept)"
            )
        return lines
