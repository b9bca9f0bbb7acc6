"""Documents out of files and folders: jsonl (plain, .gz, .zst), parquet, and any other text file (plain,
.gz or .zst).

Order is deterministic: inputs in the order given, a folder's files sorted (hidden entries skipped),
records in file order. Bad records are skipped and counted in a `ReadReport`; a file that cannot be read
to its end is reported there too, and the documents read from it before the failure are kept.
"""

import gzip
import json
import os
import re
import stat
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from data_prep.errors import UsageError
from data_prep.read_report import ReadReport
from modernbert_train import storage

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")
PARQUET_SUFFIXES = (".parquet",)
BINARY_SNIFF_BYTES = 8192  # a NUL byte in the head of a file marks it binary (git's rule of thumb)
READ_CHUNK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 4096
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
UTF8_BOM = b"\xef\xbb\xbf"  # a byte-order mark some editors put first: not text (and not JSON)


@dataclass(frozen=True)
class InputSource:
    """One file to read (a local path, or a URI fetched when it is read) and the `source` name its
    documents carry into the shards."""

    path: Path | str
    source: str
    shown: str | None = None  # how reports name it, where `path` is a local copy of a URI
    size: int | None = None  # bytes, where a URI's listing gave it (a local file has its own)

    @property
    def origin(self) -> str:
        return self.shown or str(self.path)


@dataclass(frozen=True, slots=True)
class Document:
    text: str
    source: str
    origin: str  # the file (or dataset) it came from
    line: int | None  # jsonl line / parquet or dataset row, 1-based; None for a whole-file document


def source_name(path: Path | str, is_file: bool | None = None) -> str:
    """The default source name of an input (a path or a URI): its base name without the data-format
    suffix."""
    if storage.is_uri(path):
        name = str(path).rstrip("/").rpartition("/")[2]
    else:
        name = Path(os.path.abspath(path)).name
        is_file = Path(path).is_file()
    lowered = name.lower()
    for suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if is_file and Path(name).stem else name


def _uri_files(raw: str) -> dict[str, int | None]:
    """The object at URI `raw`, else the objects under it as a folder (hidden ones skipped), sorted, with
    their sizes where the listing gives them."""
    if storage.exists(raw):
        return {raw: None}
    sizes = storage.list_sizes(raw)
    names = sorted(n for n in sizes if not any(part.startswith(".") for part in n.split("/")))
    if not names:
        raise UsageError(f"--input {raw}: no such object, nor objects under it")
    return {storage.join(raw, name): sizes[name] for name in names}


def _folder_files(folder: Path, report: ReadReport) -> Iterator[Path]:
    """The folder's files, symlinked subfolders followed (each real folder once: a link up is no loop)."""

    def unreadable_folder(error: OSError) -> None:
        report.unreadable_file(str(error.filename), error, 0)

    visited = {os.path.realpath(folder)}
    for root, dirs, files in os.walk(folder, onerror=unreadable_folder, followlinks=True):
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(root, name))
            if real not in visited:
                visited.add(real)
                kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root, name)
            try:
                regular = stat.S_ISREG(path.stat().st_mode)
            except OSError:
                regular = True  # e.g. a broken symlink: reading it reports the file as unreadable
            if regular:  # fifos, sockets and devices are not documents (and a fifo would block)
                yield path


def expand_inputs(paths: Iterable[str], source: str | None, report: ReadReport) -> list[InputSource]:
    """Every file behind the `--input` paths, in reading order, each real file once (the same file given
    twice, or inside a folder also given, or through a symlink, would be sharded twice: later ones are
    reported and passed over). A missing path is a usage error."""
    inputs, seen = [], set()
    for raw in paths:
        sizes = {}
        if storage.is_uri(raw):
            sizes = _uri_files(str(raw))
            files = list(sizes)
            name = source or source_name(raw, is_file=files == [raw])
        else:
            path = Path(raw)
            if not path.exists():
                raise UsageError(f"--input {raw}: no such file or folder")
            name = source or source_name(path)
            if path.is_dir():
                files = list(_folder_files(path, report))
            elif path.is_file():
                files = [path]
            else:
                raise UsageError(f"--input {raw}: not a regular file or folder")
        for file in files:
            real = file if storage.is_uri(file) else os.path.realpath(file)
            if real in seen:
                report.duplicate(str(file))
                continue
            seen.add(real)
            inputs.append(InputSource(file, name, size=sizes.get(file)))
    return inputs


def _decode(raw: bytes, report: ReadReport, origin: str, line: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD characters that were already in the input are not replacements.
        report.replaced(text.count("\ufffd") - raw.count("\ufffd".encode()), origin, line)
        return text


def _without_surrogates(text: str, report: ReadReport, origin: str, line: int | None) -> str:
    """JSON escapes can produce lone surrogates, which no tokenizer accepts: replace them too."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        fixed, count = LONE_SURROGATE.subn("\ufffd", text)
        report.replaced(count, origin, line)
        return fixed


def accept(value, source: str, origin: str, line: int | None, report: ReadReport) -> Document | None:
    """The record's text as a Document, or None (skipped and counted) when it is not usable text."""
    if value is None:
        report.skip("missing text field", origin, line)
    elif not isinstance(value, str):
        report.skip("non-string text", origin, line)
    elif not value or value.isspace():
        report.skip("empty text", origin, line)
    else:
        return Document(value, source, origin, line)
    return None


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) zstd file; a truncated last frame is an error."""
    with open(path, "rb") as file:
        decompressor, fed = zstandard.ZstdDecompressor().decompressobj(), False
        while chunk := file.read(READ_CHUNK_BYTES):
            while chunk:
                fed = True
                yield decompressor.decompress(chunk)
                chunk = b""
                if decompressor.eof:  # a frame ended; whatever follows starts the next one
                    chunk = decompressor.unused_data
                    decompressor, fed = zstandard.ZstdDecompressor().decompressobj(), False
        if fed:
            raise EOFError("zstd data ended before the end of its frame (truncated file?)")


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    pending: list[bytes] = []
    for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        if complete:
            complete[0] = b"".join(pending) + complete[0]
            pending = []
            yield from complete
        pending.append(rest)
    if tail := b"".join(pending):
        yield tail


def _byte_lines(path: Path) -> Iterator[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as file:
            yield from file
    elif name.endswith((".zst", ".zstd")):
        yield from _split_lines(_zstd_chunks(path))
    else:
        with open(path, "rb") as file:
            yield from file


def _read_jsonl(item: InputSource, text_field: str, report: ReadReport) -> Iterator[Document]:
    origin = item.origin
    for line_number, raw in enumerate(_byte_lines(item.path), 1):
        if line_number == 1:
            raw = raw.removeprefix(UTF8_BOM)
        if raw.isspace() or not raw:
            continue
        line = _decode(raw, report, origin, line_number)
        try:
            record = json.loads(line)
        except ValueError:
            report.skip("invalid JSON", origin, line_number)
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(value, str):
            value = _without_surrogates(value, report, origin, line_number)
        if document := accept(value, item.source, origin, line_number, report):
            yield document


def _read_parquet(item: InputSource, text_field: str, report: ReadReport) -> Iterator[Document]:
    import pyarrow.parquet as pq

    origin = item.origin
    parquet = pq.ParquetFile(item.path)
    if text_field not in parquet.schema_arrow.names:
        report.skip("missing text field", origin, None, count=parquet.metadata.num_rows)
        return
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if document := accept(value, item.source, origin, row, report):
                yield document


def _file_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip or zstd (README.gz, changelog.gz, notes.txt.zst)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as file:
            return file.read()
    if name.endswith((".zst", ".zstd")):
        return b"".join(_zstd_chunks(path))
    return path.read_bytes()


def _read_text_file(item: InputSource, text_field: str, report: ReadReport) -> Iterator[Document]:
    """The whole file as one document (decompressed first when .gz/.zst); a NUL in its head: binary."""
    origin = item.origin
    raw = _file_bytes(item.path).removeprefix(UTF8_BOM)
    if b"\0" in raw[:BINARY_SNIFF_BYTES]:
        report.binary(origin)
        return
    if document := accept(_decode(raw, report, origin, None), item.source, origin, None, report):
        yield document


def _reader(path: Path):
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return _read_jsonl
    if name.endswith(PARQUET_SUFFIXES):
        return _read_parquet
    return _read_text_file


def _read_errors() -> tuple[type[BaseException], ...]:
    import pyarrow

    return (OSError, EOFError, zlib.error, zstandard.ZstdError, pyarrow.ArrowException)


def read_documents(inputs: Iterable[InputSource], text_field: str, report: ReadReport) -> Iterator[Document]:
    """All documents of all inputs, in order; unreadable files are reported and passed over."""
    read_errors = _read_errors()
    for item in inputs:
        documents_read = 0
        try:
            with storage.local_file(item.path) as local:  # a URI's object: fetched, read, deleted
                readable = InputSource(local, item.source, item.origin)
                for document in _reader(local)(readable, text_field, report):
                    documents_read += 1
                    yield document
        except read_errors as error:
            report.unreadable_file(item.origin, error, documents_read)
