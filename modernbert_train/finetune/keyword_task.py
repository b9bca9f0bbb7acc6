"""The embedded downstream task: which Python keyword was blanked out of a line of code, given the three
lines before it and the one after.

A task that needs context: the blanked word is replaced by the tokenizer's mask token, and which of 14
keywords it was (`for` or `if`, `is` or `in`, `and` or `or`, `None` or `self`) follows from the syntax and
meaning around it, not from names a classifier could memorise. The package task (stdlib_task) turned out to
be decided by such names, and a fresh model learned it as well as a pretrained one.

Built from the same source as the default corpus (data_prep/default_corpus.py): the stdlib's .py files, test
suites left out. Keywords are found with Python's own tokenizer, so words in strings and comments are never
blanked. A file's examples all go to one split: the eval split comes only from the modules the default corpus
holds out of pretraining (default_corpus.held_for_downstream), so it scores code that neither the encoder
nor the classifier ever saw; the train split comes from the others. Classes are balanced.
"""

import io
import json
import sysconfig
import tokenize
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data_prep.default_corpus import held_for_downstream

from .data import FinetuneError
from .stdlib_task import EXCLUDED_DIRS

KEYWORDS = ("return", "if", "for", "in", "not", "is", "None", "self", "def", "else", "and", "or", "import",
            "raise")  # fmt: skip
CONTEXT_BEFORE, CONTEXT_AFTER = 3, 1
EVERY = 2  # one example per 2 eligible lines, so a file's examples are spread over it
PER_CLASS = {"train": 150, "eval": 70}


def stdlib_files(stdlib: Path) -> list[Path]:
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if not any(part in EXCLUDED_DIRS or part in ("site-packages", "dist-packages") for part in parts):
            files.append(path)
    return files


def keyword_positions(text: str) -> dict[int, list[tuple[int, int, str]]]:
    """{line index (0-based): [(start column, end column, keyword)]} for the code tokens of `text`."""
    found: dict[int, list[tuple[int, int, str]]] = {}
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.NAME and token.string in KEYWORDS and token.start[0] == token.end[0]:
                found.setdefault(token.start[0] - 1, []).append((token.start[1], token.end[1], token.string))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return {}
    return found


class SourceFile(NamedTuple):
    text: str
    lines: list[str]
    code: list[int]  # indices of the code lines (not blank, not a comment)


def read_source(path: Path) -> SourceFile:
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    code = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
    return SourceFile(text, lines, code)


def windows(source: SourceFile) -> set[str]:
    """Every run of code lines an example of the file could show, unblanked."""
    lines, code = source.lines, source.code
    width = CONTEXT_BEFORE + 1 + CONTEXT_AFTER
    return {"\n".join(lines[i] for i in code[k : k + width]) for k in range(len(code) - width + 1)}


def examples(source: SourceFile, rng: np.random.Generator, mask_token: str) -> list[dict]:
    """{"text", "label", "window"} for every EVERY-th code line holding a keyword (window: text unblanked)."""
    text, lines, code = source
    positions = keyword_positions(text)
    rows = []
    for k in range(CONTEXT_BEFORE, len(code) - CONTEXT_AFTER, EVERY):
        line_index = code[k]
        if line_index not in positions:
            continue
        choices = positions[line_index]
        start, end, keyword = choices[rng.integers(len(choices))]
        line = lines[line_index]
        blanked = f"{line[:start]}{mask_token}{line[end:]}"
        before = [lines[i] for i in code[k - CONTEXT_BEFORE : k]]
        after = [lines[i] for i in code[k + 1 : k + 1 + CONTEXT_AFTER]]
        text = "\n".join([*before, blanked, *after])
        rows.append({"text": text, "label": keyword, "window": "\n".join([*before, line, *after])})
    return rows


def build_task(output: str | Path, stdlib: Path | None = None, mask_token: str = "[MASK]") -> dict[str, Path]:
    """Write output/train.jsonl and output/eval.jsonl ({"text", "label"} per line); same files every time."""
    stdlib = stdlib or Path(sysconfig.get_paths()["stdlib"])
    rng = np.random.default_rng(0)
    pools: dict[str, dict[str, list]] = {split: {k: [] for k in KEYWORDS} for split in PER_CLASS}
    pretrained_on: set[str] = set()  # every window of the train split's files, which the corpus holds
    for path in stdlib_files(stdlib):
        split = "eval" if held_for_downstream(path.relative_to(stdlib).as_posix()) else "train"
        source = read_source(path)  # read once: for its examples and, in the train split, its windows
        for row in examples(source, rng, mask_token):
            pools[split][row["label"]].append((row["text"], row["window"]))
        if split == "train":
            pretrained_on |= windows(source)
    # The stdlib holds copies of some code (vendored modules, near-identical helpers): an eval example whose
    # lines also stand in a pretraining file, or in a train example, or twice in the eval split, is dropped.
    seen_in_train = {text for pool in pools["train"].values() for text, _ in pool}
    for split, by_keyword in pools.items():
        for keyword, pool in by_keyword.items():
            if split == "train":
                by_keyword[keyword] = list(dict.fromkeys(text for text, _ in pool))
                continue
            kept = [
                text for text, window in pool if window not in pretrained_on and text not in seen_in_train
            ]
            by_keyword[keyword] = list(dict.fromkeys(kept))
    rows: dict[str, list[dict]] = {split: [] for split in PER_CLASS}
    for split, by_keyword in pools.items():
        for keyword, pool in by_keyword.items():
            if len(pool) < PER_CLASS[split]:
                raise FinetuneError(
                    f"{stdlib}: {len(pool)} {split} examples of {keyword!r}, {PER_CLASS[split]} needed"
                )
            chosen = rng.choice(len(pool), PER_CLASS[split], replace=False)
            rows[split].extend({"text": pool[i], "label": keyword} for i in sorted(chosen))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, split_rows in rows.items():
        order = rng.permutation(len(split_rows))
        paths[split] = output / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(split_rows[i]) + "\n" for i in order))
    return paths
