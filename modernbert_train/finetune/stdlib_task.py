"""The embedded downstream task: which standard-library package a snippet of Python code comes from.

Built from the same source as the default pretraining corpus (data_prep/default_corpus.py): the stdlib's
.py files, test suites left out. Snippets are runs of consecutive lines; a file's snippets all go to one
split (by a hash of its path), so the eval split scores code from files the classifier never saw.
"""

import json
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from .data import FinetuneError

# Packages every Python from 3.10 on ships with enough code (distutils and lib2to3 are gone in 3.12/3.13).
PACKAGES = ("asyncio", "email", "idlelib", "importlib", "multiprocessing", "tkinter", "unittest", "xml")
EXCLUDED_DIRS = {"test", "tests", "idle_test", "__pycache__"}
SNIPPET_LINES = 12
SNIPPETS_PER_FILE = 16  # big files would otherwise crowd the small ones out of a class
EVAL_SHARE = 0.35  # of each package's files
PER_CLASS = {"train": 40, "eval": 30}


def package_files(stdlib: Path, package: str) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(stdlib / package):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        files.extend(Path(folder, name) for name in sorted(names) if name.endswith(".py"))
    return files


def snippets(path: Path) -> list[str]:
    """Non-overlapping windows of SNIPPET_LINES non-blank lines, evenly spread over the file."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    windows = ["\n".join(lines[i : i + SNIPPET_LINES]) for i in range(0, len(lines), SNIPPET_LINES)]
    windows = [w for w in windows if len(w) >= 200]
    if len(windows) > SNIPPETS_PER_FILE:
        windows = [windows[i] for i in np.linspace(0, len(windows) - 1, SNIPPETS_PER_FILE).astype(int)]
    return windows


def split_of(relative: str) -> str:
    return "eval" if zlib.crc32(relative.encode()) % 1000 < EVAL_SHARE * 1000 else "train"


def build_task(output: str | Path, stdlib: Path | None = None) -> dict[str, Path]:
    """Write output/train.jsonl and output/eval.jsonl ({"text", "label"} per line); same files every time."""
    stdlib = stdlib or Path(sysconfig.get_paths()["stdlib"])
    rng = np.random.default_rng(0)
    rows = {"train": [], "eval": []}
    for package in PACKAGES:
        pools = {"train": [], "eval": []}
        for path in package_files(stdlib, package):
            relative = path.relative_to(stdlib).as_posix()
            pools[split_of(relative)].extend(snippets(path))
        for split, pool in pools.items():
            if len(pool) < PER_CLASS[split]:
                raise FinetuneError(
                    f"{stdlib / package}: {len(pool)} {split} snippets, {PER_CLASS[split]} needed"
                )
            chosen = rng.choice(len(pool), PER_CLASS[split], replace=False)
            rows[split].extend({"text": pool[i], "label": package} for i in sorted(chosen))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, split_rows in rows.items():
        order = rng.permutation(len(split_rows))
        paths[split] = output / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(split_rows[i]) + "\n" for i in order))
    return paths
