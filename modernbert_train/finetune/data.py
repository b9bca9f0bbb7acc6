"""Labelled examples from JSONL, CSV or TSV files, as GLUE-style tasks ship them."""

import csv
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modernbert_train import storage

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


def _read_text(path: str) -> str:
    """The file's text (local or a URI): UTF-8, a leading byte-order mark dropped (spreadsheets write one)."""
    if not storage.is_uri(path) and not Path(path).is_file():
        raise FinetuneError(f"{path}: no such file")
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise FinetuneError(f"{path}: no such file") from None
    except OSError as error:
        raise FinetuneError(f"{path}: cannot read it: {error.strerror or error}") from None
    return storage.decode_text(data, path, byte_order_mark=True)


def _records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each example in the file."""
    suffix = Path(path.rstrip("/")).suffix
    kind = FORMATS.get(suffix.lower())
    if kind is None:
        raise FinetuneError(f"{path}: unknown format {suffix!r}; expected .jsonl, .csv or .tsv")
    file = io.StringIO(_read_text(path), newline="")
    if kind == "jsonl":
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise FinetuneError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise FinetuneError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record
        return
    # GLUE's TSV files are unquoted (a cell may begin with a quotation mark that never closes); CSV
    # files follow the usual quoting, strictly: a quote left open would otherwise swallow the rest of the
    # file into one cell, reported as a missing field.
    options = (
        {"delimiter": ",", "strict": True}
        if kind == "csv"
        else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    )
    reader = csv.reader(file, **options)
    header = None
    while True:
        start = reader.line_num + 1  # the line the next record starts on (a quoted cell may span lines)
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if str(error) == "unexpected end of data":
                raise FinetuneError(
                    f"{path}:{start}: a quoted field in the record starting here is never closed (its "
                    "quotation mark runs to the end of the file)"
                ) from None
            raise FinetuneError(f"{path}:{start}: {error}") from None
        if header is None:
            header = row
        elif row:  # blank lines hold no record
            if len(row) > len(header):
                raise FinetuneError(f"{path}:{start}: more columns than the header has")
            yield start, {**dict.fromkeys(header), **dict(zip(header, row))}


def _text(path: str, number: int, record: dict, field: str) -> str:
    if field not in record or record[field] is None:
        raise FinetuneError(f"{path}:{number}: no field {field!r} (fields: {', '.join(map(str, record))})")
    value = record[field]
    if not isinstance(value, str):
        raise FinetuneError(f"{path}:{number}: field {field!r} is {type(value).__name__}, expected text")
    return value


def _label(path: str, number: int, record: dict, field: str, regression: bool) -> str | float:
    if field not in record or record[field] in (None, ""):
        raise FinetuneError(f"{path}:{number}: no field {field!r} (fields: {', '.join(map(str, record))})")
    value = record[field]
    if regression:
        try:
            if isinstance(value, bool):
                raise ValueError
            number_value = float(value)
        except (TypeError, ValueError):
            raise FinetuneError(
                f"{path}:{number}: label {value!r} is not a number (--task regression)"
            ) from None
        if not math.isfinite(number_value):
            raise FinetuneError(
                f"{path}:{number}: label {value!r} is not a finite number (--task regression)"
            )
        return number_value
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise FinetuneError(f"{path}:{number}: label {value!r} is not a class name or integer")
    # "neg " and "neg" are one class (spreadsheets and hand-edited files leave such spaces).
    if not (name := str(value).strip()):
        raise FinetuneError(f"{path}:{number}: label {value!r} is blank")
    return name


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
    path = str(path)
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
        numeric = all(re.fullmatch(r"-?[0-9]+", name) for name in names)
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
