"""Labelled examples from JSONL, CSV or TSV files, as GLUE-style tasks ship them."""

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


class FinetuneError(ValueError):
    """Bad input to fine-tuning; the message names the file, line, field or flag."""


@dataclass
class Examples:
    """texts (and pairs) with labels: class indices into `label_names`, or floats for regression."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[float] | list[int]
    label_names: list[str] | None


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each example in the file."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise FinetuneError(f"{path}: unknown format {path.suffix!r}; expected .jsonl, .csv or .tsv")
    if not path.is_file():
        raise FinetuneError(f"{path}: no such file")
    with path.open(newline="", encoding="utf-8") as file:
        if kind == "jsonl":
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise FinetuneError(f"{path}:{number}: not JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise FinetuneError(
                        f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
                    )
                yield number, record
        else:
            reader = csv.DictReader(file, delimiter="," if kind == "csv" else "\t")
            try:
                for record in reader:
                    if None in record:  # more cells than the header names
                        raise FinetuneError(f"{path}:{reader.line_num}: more columns than the header has")
                    yield reader.line_num, record
            except csv.Error as error:
                raise FinetuneError(f"{path}:{reader.line_num}: {error}") from None


def _text(path: Path, number: int, record: dict, field: str) -> str:
    if field not in record or record[field] is None:
        raise FinetuneError(f"{path}:{number}: no field {field!r} (fields: {', '.join(map(str, record))})")
    value = record[field]
    if not isinstance(value, str):
        raise FinetuneError(f"{path}:{number}: field {field!r} is {type(value).__name__}, expected text")
    return value


def _label(path: Path, number: int, record: dict, field: str, regression: bool) -> str | float:
    if field not in record or record[field] in (None, ""):
        raise FinetuneError(f"{path}:{number}: no field {field!r} (fields: {', '.join(map(str, record))})")
    value = record[field]
    if regression:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except ValueError:
            raise FinetuneError(
                f"{path}:{number}: label {value!r} is not a number (--task regression)"
            ) from None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise FinetuneError(f"{path}:{number}: label {value!r} is not a class name or integer")
    return str(value)


def read_examples(
    path: str | Path,
    text_field: str,
    label_field: str,
    pair_field: str | None = None,
    regression: bool = False,
    label_names: list[str] | None = None,
) -> Examples:
    """Read one split. Classification labels become indices into `label_names` (the training split's
    sorted classes when not given; numerically sorted when all are integers)."""
    path = Path(path)
    texts, pairs, raw_labels, numbers = [], [], [], []
    for number, record in _records(path):
        texts.append(_text(path, number, record, text_field))
        if pair_field:
            pairs.append(_text(path, number, record, pair_field))
        raw_labels.append(_label(path, number, record, label_field, regression))
        numbers.append(number)
    if not texts:
        raise FinetuneError(f"{path}: no examples")
    if regression:
        return Examples(texts, pairs if pair_field else None, raw_labels, None)
    if label_names is None:
        names = set(raw_labels)
        numeric = all(name.lstrip("-").isdigit() for name in names)
        label_names = sorted(names, key=int if numeric else str)
        if len(label_names) < 2:
            raise FinetuneError(
                f"{path}: every example has label {label_names[0]!r}; need at least two classes"
            )
    index = {name: i for i, name in enumerate(label_names)}
    labels = []
    for number, label in zip(numbers, raw_labels):
        if label not in index:
            raise FinetuneError(f"{path}:{number}: label {label!r} does not occur in the training file")
        labels.append(index[label])
    return Examples(texts, pairs if pair_field else None, labels, label_names)
