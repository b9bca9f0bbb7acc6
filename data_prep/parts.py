"""Sharding across machines: task I of N shards a deterministic 1/N of the input files into its own part
`OUTPUT/part-IIIII-of-NNNNN/`; `merge` then writes OUTPUT's root index.json (streaming's merge_index) and
a modernbert_data.json that sums the parts, once every part is finished.

The files are split into N contiguous runs of about equal bytes, so the parts in order hold the documents
of a single task in the same order. A single file is never split.
"""

import json
import os
import re
from pathlib import Path

from data_prep.errors import UsageError
from data_prep.output_dir import FINISHED_MARKER, read_marker
from data_prep.readers import InputSource
from modernbert_train import storage

PART = re.compile(r"part-(\d{5})-of-(\d{5})")


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def task_from_environment() -> tuple[int, int]:
    """(task index, task count) of a SLURM array or a Kubernetes indexed job; (0, 1) elsewhere.

    A Kubernetes indexed job gives only the index: its count comes from --num-tasks."""
    environ = os.environ
    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        first = _environment_count("SLURM_ARRAY_TASK_MIN", "0")
        return _environment_count("SLURM_ARRAY_TASK_ID") - first, _environment_count("SLURM_ARRAY_TASK_COUNT")
    if "JOB_COMPLETION_INDEX" in environ:
        return _environment_count("JOB_COMPLETION_INDEX"), 1
    return 0, 1


def _environment_count(name: str, default: str | None = None) -> int:
    value = os.environ.get(name, default)
    if value is None or not value.strip().isdigit():
        raise UsageError(f"environment variable {name}={value!r}: expected a non-negative integer")
    return int(value)


def resolve_task(task_index: int | None, num_tasks: int | None) -> tuple[int, int]:
    index, count = task_from_environment()
    index = index if task_index is None else task_index
    count = count if num_tasks is None else num_tasks
    if count < 1 or not 0 <= index < count:
        given = (
            f"--task-index {index}"
            if task_index is not None
            else f"the task index {index} (from the environment)"
        )
        raise UsageError(f"{given}: must be between 0 and --num-tasks - 1 ({count - 1})")
    return index, count


def task_inputs(inputs: list[InputSource], index: int, count: int) -> list[InputSource]:
    """Task `index`'s contiguous run of the files: file k belongs to the task its middle byte falls in."""
    sizes = [max(_size(item), 1) for item in inputs]
    total, before, mine = sum(sizes), 0, []
    for item, size in zip(inputs, sizes):
        if (before + size / 2) * count // total == index:
            mine.append(item)
        before += size
    return mine


def _size(item: InputSource) -> int:
    if item.size is not None:
        return item.size
    if storage.is_uri(item.path) or not Path(item.path).exists():
        return 1
    return Path(item.path).stat().st_size


def merge(output: str) -> dict:
    """Write OUTPUT/index.json over all parts and OUTPUT/modernbert_data.json; return the latter."""
    from streaming.base.util import merge_index

    storage.check(output, "merge")
    parts = sorted(
        {name.split("/")[0] for name in storage.list_files(output) if PART.fullmatch(name.split("/")[0])}
    )
    if not parts:
        raise UsageError(f"merge {output}: no part-IIIII-of-NNNNN folders (shard with --num-tasks first)")
    counts = {int(PART.fullmatch(part)[2]) for part in parts}
    if len(counts) != 1:
        raise UsageError(
            f"merge {output}: parts of different task counts {sorted(counts)}; remove the stale ones"
        )
    count = counts.pop()
    missing = [
        part_name(i, count)
        for i in range(count)
        if not storage.exists(storage.join(output, part_name(i, count), FINISHED_MARKER))
    ]
    if missing:
        raise UsageError(
            f"merge {output}: {len(missing)} of {count} parts are missing or unfinished: {', '.join(missing)}"
        )
    names = [part_name(i, count) for i in range(count)]
    keys = ("tokenizer", "columns", "documents")
    metadata = [
        read_marker(storage.join(output, name, FINISHED_MARKER), f"merge {output}", keys) for name in names
    ]
    for name, part in zip(names[1:], metadata[1:]):
        if part["tokenizer"] != metadata[0]["tokenizer"] or part["columns"] != metadata[0]["columns"]:
            raise UsageError(f"merge {output}: {name} was sharded with another tokenizer than {names[0]}")
    if not sum(part["documents"] for part in metadata):
        raise UsageError(f"merge {output}: the {count} parts hold 0 documents together; nothing to merge")
    # keep_local=False deletes merge_index's local folder: the output itself when that is local.
    indexes = [storage.join(output, name, "index.json") for name in names]
    merge_index(indexes, output, keep_local=not storage.is_uri(output))
    sources: dict[str, dict[str, int]] = {}
    for part in metadata:
        for source, counts_of in part["sources"].items():
            total = sources.setdefault(source, {"documents": 0, "tokens": 0})
            total["documents"] += counts_of["documents"]
            total["tokens"] += counts_of["tokens"]
    merged = {
        **{k: v for k, v in metadata[0].items() if k not in ("read_problems",)},
        "documents": sum(part["documents"] for part in metadata),
        "tokens": sum(part["tokens"] for part in metadata),
        "shards": sum(part["shards"] for part in metadata),
        "sources": dict(sorted(sources.items())),
        "parts": names,
    }
    tokenizer = storage.read_bytes(storage.join(output, names[0], "tokenizer.json"))
    storage.write_bytes(storage.join(output, "tokenizer.json"), tokenizer)
    storage.write_text(storage.join(output, FINISHED_MARKER), json.dumps(merged, indent=2) + "\n")
    return merged
