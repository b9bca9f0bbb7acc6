"""The default corpus, built from text every machine has: `python -m data_prep.default_corpus --output DIR`.

Sources: the Python standard library's modules (code mixed with docstrings and comments, test suites
left out), the standard library's own .txt/.rst files, and /usr/share/common-licenses where it exists.
Writes DIR/tokenizer (BPE trained on the training documents), DIR/train and DIR/val (every 32nd
document held out), each the same kind of folder `modernbert-data` writes, and DIR/corpus.json (how it was
chosen) last. The selection is deterministic.

A fifth of the standard library's modules (`held_for_downstream`) is never pretrained on: `make eval`'s
embedded task scores the encoder on code from those files only, so its score cannot come from having seen
the very lines under masked-LM training.
"""

import json
import os
import sys
import sysconfig
import time
import zlib
from pathlib import Path

from data_prep.cli import EXIT_USAGE, OneLineErrorParser
from data_prep.errors import UsageError
from data_prep.read_report import ReadReport
from data_prep.readers import InputSource, read_documents
from data_prep.shard import shard
from data_prep.tokenizer_load import load_tokenizer
from data_prep.tokenizer_train import train_tokenizer

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
LICENSES = Path("/usr/share/common-licenses")
VAL_EVERY = 32  # documents 0, 32, 64, ... of the sorted selection are held out (about 3%)
DEFAULT_MAX_BYTES = 24 << 20  # keeps the build well under a minute and a half on 2 cores
DEFAULT_VOCAB_SIZE = 8192
DOWNSTREAM_SHARE = 0.2  # of the stdlib's modules, by a hash of their path: kept for the downstream eval
# Bumped whenever the selection changes, so a corpus built by an older rule is rebuilt, not reused.
CORPUS_VERSION = 2
CORPUS_FILE = "corpus.json"


def held_for_downstream(relative: str) -> bool:
    """Whether the stdlib module at `relative` (posix path below the stdlib folder) is kept out of the
    corpus for the downstream task's eval split."""
    return zlib.crc32(f"downstream/{relative}".encode()) % 1000 < DOWNSTREAM_SHARE * 1000


def _stdlib_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith(".")]
        files.extend(Path(folder, name) for name in names if name.endswith(suffixes))
    return files


def _license_files(licenses: Path) -> list[Path]:
    if not licenses.is_dir():
        return []
    # Several names there are symlinks to one text (GPL -> GPL-3): keep each text once.
    by_target = {}
    for path in sorted(licenses.iterdir()):
        if path.is_file():
            by_target.setdefault(path.resolve(), path)
    return list(by_target.values())


def select_files(max_bytes: int, stdlib: Path | None = None, licenses: Path = LICENSES) -> list[InputSource]:
    """The corpus files in reading order (sorted by path), at most `max_bytes` of them in total.

    When the cap bites, files are taken in an order fixed by a hash of their path below the stdlib (or
    licenses) folder, so a small cap still samples the whole library rather than its alphabetical head,
    and every install of the same Python version picks the same files.
    """
    stdlib = stdlib or Path(sysconfig.get_paths()["stdlib"])
    modules = _stdlib_files(stdlib, (".py",))
    candidates = [
        InputSource(p, "python-stdlib")
        for p in modules
        if not held_for_downstream(p.relative_to(stdlib).as_posix())
    ]
    candidates += [InputSource(p, "python-stdlib-docs") for p in _stdlib_files(stdlib, (".txt", ".rst"))]
    candidates += [InputSource(p, "licenses") for p in _license_files(licenses)]

    def stable_name(item: InputSource) -> str:
        # Relative to its root: the absolute path (/usr/lib/python3.11/..., a venv's or pyenv's prefix)
        # differs between installs, and hashing it made each machine pick a different corpus.
        root = licenses if item.source == "licenses" else stdlib
        return f"{item.source}/{item.path.relative_to(root).as_posix()}"

    chosen, total = [], 0
    for item in sorted(
        candidates, key=lambda item: (zlib.crc32(stable_name(item).encode()), stable_name(item))
    ):
        size = item.path.stat().st_size
        if total + size <= max_bytes:
            chosen.append(item)
            total += size
    return sorted(chosen, key=lambda item: str(item.path))


def corpus_record(max_bytes: int) -> dict:
    return {"version": CORPUS_VERSION, "max_bytes": max_bytes, "downstream_share": DOWNSTREAM_SHARE}


def is_complete(output: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """A finished build by the current selection rule (corpus.json is written last)."""
    try:
        record = json.loads((output / CORPUS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return record == corpus_record(max_bytes)


def build(output: Path, *, overwrite: bool, max_bytes: int, vocab_size: int, workers: int) -> dict | None:
    """Build the corpus; None when it is already complete and not to be overwritten."""
    if is_complete(output, max_bytes) and not overwrite:
        return None
    (output / CORPUS_FILE).unlink(missing_ok=True)  # written again last, once the build is whole
    start = time.perf_counter()
    files = select_files(max_bytes)
    if not files:
        raise UsageError("no corpus files found (is the Python standard library installed?)")
    val_files = files[::VAL_EVERY]
    held_out = set(val_files)
    train_files = [item for item in files if item not in held_out]
    roots = [sysconfig.get_paths()["stdlib"]] + ([str(LICENSES)] if LICENSES.is_dir() else [])

    # Parts left by an interrupted build are replaced: this folder belongs to the builder.
    texts = (document.text for document in read_documents(train_files, "text", ReadReport()))
    train_tokenizer(texts, output / "tokenizer", vocab_size, overwrite=True)
    tokenizer = load_tokenizer(str(output / "tokenizer"))
    summary = {"files": len(files), "bytes": sum(item.path.stat().st_size for item in files)}
    for split, split_files in (("train", train_files), ("val", val_files)):
        report = ReadReport()
        documents = read_documents(split_files, "text", report)
        metadata = shard(
            documents, output / split, tokenizer, report=report, workers=workers, overwrite=True, inputs=roots
        )
        summary[split] = {key: metadata[key] for key in ("documents", "tokens", "sources")}
    summary["vocab_size"] = tokenizer.vocab_size
    summary["seconds"] = time.perf_counter() - start
    (output / CORPUS_FILE).write_text(json.dumps(corpus_record(max_bytes)) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(
        prog="python -m data_prep.default_corpus", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--output", type=Path, default=Path("data/default"), metavar="DIR")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even when DIR is complete")
    parser.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="cap on the corpus text size"
    )
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code
    try:
        if args.max_bytes < 1 or args.workers < 1:
            raise UsageError("--max-bytes and --workers must be positive")
        summary = build(
            args.output,
            overwrite=args.overwrite,
            max_bytes=args.max_bytes,
            vocab_size=args.vocab_size,
            workers=args.workers,
        )
    except UsageError as error:
        print(f"default_corpus: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if summary is None:
        print(f"{args.output} is already complete (tokenizer, train, val); --overwrite rebuilds it")
        return 0
    print(
        f"default corpus in {args.output}: {summary['files']} files ({summary['bytes'] / 1e6:.1f} MB), "
        f"vocab {summary['vocab_size']}, {summary['seconds']:.0f} s"
    )
    for split in ("train", "val"):
        counts = summary[split]
        sources = ", ".join(f"{name} {c['documents']}" for name, c in counts["sources"].items())
        print(f"  {split}: {counts['documents']:,} documents, {counts['tokens']:,} tokens ({sources})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
