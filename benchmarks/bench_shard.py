"""Shard throughput against raw `Tokenizer.encode_batch` on the same text: `python -m benchmarks.bench_shard`.

Text: about 16 MB of the Python standard library's sources, tokenized by a BPE (vocab 8192) trained on a
slice of it. Raw: `encode_batch` over the texts already in memory, on 1 thread and on every CPU (the
tokenizers thread pool), measured just before and just after the shard run and averaged. Shard:
`modernbert-data shard` end to end (reading the files, tokenizing in worker processes, writing zstd MDS
shards) with 1 worker and with one per CPU. The ratios compare like with like: 1 worker against 1 thread,
N workers against N threads. Target: >= 0.8. Shard encodes with `encode_batch_fast` (no character
offsets), so its rate is also given against that, the stricter reference.
"""

import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from data_prep.read_report import ReadReport
from data_prep.readers import InputSource, read_documents
from data_prep.shard import shard
from data_prep.tokenizer_load import for_sharding, load_tokenizer
from data_prep.tokenizer_train import build_tokenizer, save_tokenizer

TEXT_BYTES = 16 << 20
VOCAB_SIZE = 8192
TOKENIZER_TRAINING_SHARE = 10  # train the tokenizer on every 10th file


def stdlib_sources(limit: int) -> list[Path]:
    """The standard library's .py files (tests included: this is about volume) in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    chosen, total = [], 0
    for path in files:
        if total >= limit:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


def raw_encode_rate(
    tokenizer: Tokenizer, texts: list[str], threads: int, method: str = "encode_batch"
) -> float:
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    start = time.perf_counter()
    encodings = getattr(tokenizer, method)(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    return sum(len(e.ids) for e in encodings) / seconds


def shard_rate(files: list[Path], output: Path, tokenizer, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    report = ReadReport()
    documents = read_documents([InputSource(p, "stdlib") for p in files], "text", report)
    metadata = shard(documents, output, tokenizer, report=report, workers=workers, overwrite=True)
    return metadata["tokens"] / (time.perf_counter() - start), metadata["tokens"]


def main() -> dict:
    import streaming  # noqa: F401  (imports torch: keep its seconds out of the timings)

    cpus = len(os.sched_getaffinity(0))
    saved_parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    files = stdlib_sources(TEXT_BYTES)
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in files]
    texts = [t for t in texts if t and not t.isspace()]  # what shard keeps
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(build_tokenizer(texts[::TOKENIZER_TRAINING_SHARE], VOCAB_SIZE), Path(tmp))
        loaded = load_tokenizer(tmp)
        tokenizer = for_sharding(Tokenizer.from_str(loaded.json_text))
        result = {
            "text_mb": round(sum(p.stat().st_size for p in files) / 1e6, 1),
            "documents": len(texts),
            "cpus": cpus,
            "vocab_size": loaded.vocab_size,
        }
        for count in sorted({1, cpus}):
            # Raw runs just before and just after the shard run: load on a shared machine drifts.
            before = raw_encode_rate(tokenizer, texts, threads=count)
            sharded, tokens = shard_rate(files, Path(tmp, f"out{count}"), loaded, workers=count)
            after = raw_encode_rate(tokenizer, texts, threads=count)
            raw = (before + after) / 2
            result["tokens"] = tokens
            result[f"raw_encode_batch_tokens_per_s_{count}_threads"] = round(raw)
            result[f"raw_spread_{count}"] = round(abs(before - after) / raw, 3)
            result[f"shard_tokens_per_s_{count}_workers"] = round(sharded)
            result[f"shard_vs_raw_{count}"] = round(sharded / raw, 3)
        fast = raw_encode_rate(tokenizer, texts, threads=cpus, method="encode_batch_fast")
        result[f"raw_encode_batch_fast_tokens_per_s_{cpus}_threads"] = round(fast)
        result[f"shard_vs_raw_fast_{cpus}"] = round(result[f"shard_tokens_per_s_{cpus}_workers"] / fast, 3)
    if saved_parallelism is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = saved_parallelism
    result["target_shard_vs_raw"] = 0.8
    for key, value in result.items():
        print(f"  {key}: {value:,}" if isinstance(value, int) else f"  {key}: {value}", flush=True)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
