"""Count what an MDS folder written by `modernbert-data shard` holds, straight from its shards.

Shards are decompressed in memory and their samples decoded with streaming's `MDSReader`, so the folder
is only read (a `StreamingDataset` would unpack shards into it).
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np

from data_prep.errors import UsageError
from data_prep.output_dir import read_marker
from data_prep.shard import METADATA_FILE


def iter_samples(folder: Path):
    """Every sample of an MDS folder, decoded (dicts of column values), in order."""
    for shard_info in json.loads((folder / "index.json").read_text())["shards"]:
        yield from _shard_samples(folder, shard_info)


def _shard_samples(folder: Path, shard_info: dict):
    """Every decoded sample of one shard (layout: count, count+1 uint32 offsets, config, samples). A shard
    that is missing, truncated or damaged is a UsageError naming it and the reason, in one line."""
    from streaming.base.compression import decompress
    from streaming.base.format.mds.reader import MDSReader

    zipped = shard_info.get("zip_data")
    name = (zipped or shard_info.get("raw_data") or {}).get("basename", "?")
    try:
        reader = MDSReader.from_json(str(folder), None, shard_info)
        if zipped:
            data = decompress(shard_info["compression"], (folder / name).read_bytes())
        else:
            data = (folder / name).read_bytes()
        expected = (shard_info.get("raw_data") or {}).get("bytes")
        if expected is not None and len(data) != expected:
            raise ValueError(f"{len(data)} bytes where index.json lists {expected}")
        count = int(np.frombuffer(data, np.uint32, 1)[0])
        if count != shard_info.get("samples", count):
            raise ValueError(f"{count} samples where index.json lists {shard_info['samples']}")
        offsets = np.frombuffer(data, np.uint32, count + 1, offset=4).tolist()
        samples = [reader.decode_sample(data[begin:end]) for begin, end in zip(offsets, offsets[1:])]
    except FileNotFoundError:
        raise UsageError(f"inspect {folder}: shard {name} is missing (listed in index.json)") from None
    except Exception as e:  # zstd "Data corruption detected", a truncated buffer, an undecodable sample
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"inspect {folder}: shard {name} cannot be read: {reason}") from None
    yield from samples


def _input_ids_dtype(shards: list[dict]) -> str | None:
    if not shards:
        return None
    encoding = shards[0]["column_encodings"][shards[0]["column_names"].index("input_ids")]
    return encoding.removeprefix("ndarray:")


def inspect_folder(folder: Path) -> dict:
    index_path = folder / "index.json"
    if not folder.is_dir():
        raise UsageError(f"inspect {folder}: no such folder")
    if not index_path.is_file():
        raise UsageError(f"inspect {folder}: no index.json (not an MDS folder)")
    try:
        shards = json.loads(index_path.read_text())["shards"]
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"inspect {index_path}: not an MDS index ({' '.join(str(e).split())})") from None
    for shard_info in shards:
        if "input_ids" not in shard_info.get("column_names", []):
            raise UsageError(f"inspect {folder}: the shards have no input_ids column")
    lengths, source_documents, source_tokens = [], Counter(), Counter()
    for sample in iter_samples(folder):
        length = len(sample["input_ids"])
        lengths.append(length)
        source = sample.get("source", "")
        source_documents[source] += 1
        source_tokens[source] += length
    lengths = np.array(lengths, dtype=np.int64)
    result = {
        "path": str(folder),
        "documents": int(lengths.size),
        "tokens": int(lengths.sum()),
        "shards": len(shards),
        "dtype": _input_ids_dtype(shards),
        "min_length": int(lengths.min()) if lengths.size else 0,
        "max_length": int(lengths.max()) if lengths.size else 0,
        "mean_length": float(lengths.mean()) if lengths.size else 0.0,
        "sources": {
            s: {"documents": source_documents[s], "tokens": source_tokens[s]}
            for s in sorted(source_documents)
        },
        "length_histogram": _power_of_two_histogram(lengths),
    }
    metadata_path = folder / METADATA_FILE
    if metadata_path.is_file():
        result["tokenizer"] = read_marker(metadata_path, f"inspect {folder}", ("tokenizer",))["tokenizer"]
    return result


def _power_of_two_histogram(lengths: np.ndarray) -> list[dict]:
    """Documents per length bucket [2^k, 2^(k+1)); empty documents (never written by shard) in [0, 1)."""
    if not lengths.size:
        return []
    buckets = np.where(lengths > 0, np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64) + 1, 0)
    counts = np.bincount(buckets)
    histogram = []
    for bucket, count in enumerate(counts.tolist()):
        low = 0 if bucket == 0 else 1 << (bucket - 1)
        high = 1 if bucket == 0 else 1 << bucket
        if count:
            histogram.append({"min": low, "max_exclusive": high, "documents": count})
    return histogram


def format_report(result: dict) -> str:
    lines = [
        f"{result['path']}",
        f"  documents: {result['documents']:,}",
        f"  tokens:    {result['tokens']:,} (special tokens excluded)",
        f"  shards:    {result['shards']}  dtype: {result['dtype']}",
        f"  length:    min {result['min_length']:,}  mean {result['mean_length']:,.1f}"
        f"  max {result['max_length']:,}",
        "  sources:",
    ]
    for name, counts in result["sources"].items():
        lines.append(f"    {name}: {counts['documents']:,} documents, {counts['tokens']:,} tokens")
    lines.append("  length histogram (tokens per document):")
    widest = max((row["documents"] for row in result["length_histogram"]), default=1)
    for row in result["length_histogram"]:
        bar = "#" * max(1, round(40 * row["documents"] / widest))
        span = f"[{row['min']:,}, {row['max_exclusive']:,})"
        lines.append(f"    {span:>20} {row['documents']:>10,} {bar}")
    return "\n".join(lines)
