"""Shard throughput against the raw tokenizer on the same text: `python -m benchmarks.bench_shard`.

Text: about 8 MB of the Python standard library's sources, tokenized by a BPE (vocab 8192) trained on a
slice of it, in two layouts: `files` (each .py file one document, about 16 kB on average) and `jsonl` (the
same text split at blank lines into one jsonl file, a few hundred bytes a document, so per-document costs
show). Raw: the call shard itself encodes with, `encode_batch_fast(texts, add_special_tokens=False)`, over
the same documents already in memory. Each raw measurement runs in a fresh process whose tokenizers thread
pool is sized by RAYON_NUM_THREADS before it exists (the pool is process-wide and fixed once created); it
reports the threads and CPU time it used, so the thread count is checked, not assumed. Shard:
`data_prep.shard.shard` end to end (reading the files, tokenizing in worker processes, writing zstd MDS
shards; imports excluded). Like with like: 1 worker against 1 thread, N workers against N threads
(N = the CPUs). Raw and shard alternate for ROUNDS rounds (shared machines drift); the ratio is the median
of each round's shard/raw (a pair measured back to back), reported with the load average.
Target: shard >= 0.8 of raw.
"""

import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

TEXT_BYTES = 8 << 20
VOCAB_SIZE = 8192
TOKENIZER_TRAINING_SHARE = 10  # train the tokenizer on every 10th file
ROUNDS = 4
TARGET = 0.8


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


def is_document(text: str) -> bool:
    return bool(text) and not text.isspace()  # what the readers keep


def layouts(folder: Path):
    """{layout: (the inputs to shard, the documents it makes of them)}, both layouts of the same text."""
    from data_prep.readers import InputSource

    files = stdlib_sources(TEXT_BYTES)
    texts = [t for t in (p.read_bytes().decode("utf-8", errors="replace") for p in files) if is_document(t)]
    paragraphs = [p for text in texts for p in text.split("\n\n") if is_document(p)]
    jsonl = folder / "paragraphs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return {
        "files": ([InputSource(p, "stdlib") for p in files], texts),
        "jsonl": ([InputSource(jsonl, "stdlib")], paragraphs),
    }


def raw_encode(texts_json: str, tokenizer_dir: str) -> dict:
    """Run in a fresh process (see `raw_in_subprocess`): one timed `encode_batch_fast` over all texts."""
    from tokenizers import Tokenizer

    from data_prep.tokenizer_load import for_sharding

    texts = json.loads(Path(texts_json).read_text())
    tokenizer = for_sharding(Tokenizer.from_file(str(Path(tokenizer_dir, "tokenizer.json"))))
    start, cpu_start = time.perf_counter(), time.process_time()
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "tokens": sum(len(e) for e in encodings),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "threads": len(os.listdir("/proc/self/task")),  # the main thread plus the pool, if one started
    }


def raw_in_subprocess(texts_json: Path, tokenizer_dir: str, threads: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    # With parallelism off, tokenizers encodes in the calling thread and never starts its pool.
    env["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    command = [sys.executable, "-m", "benchmarks.bench_shard", "--raw", str(texts_json), tokenizer_dir]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def shard_run(inputs: list, output: Path, tokenizer, workers: int) -> dict:
    from data_prep.read_report import ReadReport
    from data_prep.readers import read_documents
    from data_prep.shard import shard

    start, cpu_start = time.perf_counter(), os.times()
    report = ReadReport()
    documents = read_documents(inputs, "text", report)
    metadata = shard(documents, output, tokenizer, report=report, workers=workers, overwrite=True)
    seconds, cpu_end = time.perf_counter() - start, os.times()
    # The pool's workers are joined before shard returns, so their time is in the children's fields.
    cpu = sum(cpu_end[:4]) - sum(cpu_start[:4])
    return {"tokens": metadata["tokens"], "seconds": seconds, "cpu_seconds": cpu}


def summary(name: str, runs: dict, counts: list[int]) -> dict:
    tokens = {run["tokens"] for measured in runs.values() for run in measured}
    assert len(tokens) == 1, f"{name}: raw and shard disagree on the token count: {sorted(tokens)}"
    result = {f"{name}_tokens": tokens.pop()}
    for count in counts:
        raw, sharded = runs["raw", count], runs["shard", count]
        raw_rate = statistics.median(r["tokens"] / r["seconds"] for r in raw)
        shard_rate = statistics.median(r["tokens"] / r["seconds"] for r in sharded)
        result[f"{name}_raw_tokens_per_s_{count}_threads"] = round(raw_rate)
        result[f"{name}_raw_threads_seen_{count}"] = max(r["threads"] for r in raw)
        result[f"{name}_shard_tokens_per_s_{count}_workers"] = round(shard_rate)
        ratios = [(s["tokens"] / s["seconds"]) / (r["tokens"] / r["seconds"]) for r, s in zip(raw, sharded)]
        result[f"{name}_shard_vs_raw_{count}"] = round(statistics.median(ratios), 3)
        result[f"{name}_shard_vs_raw_{count}_each_round"] = [round(ratio, 2) for ratio in ratios]
        for kind, measured in (("raw", raw), ("shard", sharded)):
            busy = statistics.median(r["cpu_seconds"] / r["seconds"] for r in measured)
            result[f"{name}_{kind}_cores_busy_{count}"] = round(busy, 2)
        # CPU seconds per token move less with other processes' load than wall-clock rates do.
        raw_cpu = statistics.median(r["cpu_seconds"] for r in raw)
        shard_cpu = statistics.median(r["cpu_seconds"] for r in sharded)
        result[f"{name}_shard_vs_raw_cpu_efficiency_{count}"] = round(raw_cpu / shard_cpu, 3)
    return result


def main() -> dict:
    import streaming  # noqa: F401  (imports torch: keep its seconds out of the timings)

    from data_prep.tokenizer_load import load_tokenizer
    from data_prep.tokenizer_train import build_tokenizer, save_tokenizer

    cpus = len(os.sched_getaffinity(0))
    counts = sorted({1, cpus})
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    result = {"cpus": cpus, "rounds": ROUNDS}
    with tempfile.TemporaryDirectory() as tmp:
        inputs_and_texts = layouts(Path(tmp))
        files_texts = inputs_and_texts["files"][1]
        save_tokenizer(build_tokenizer(files_texts[::TOKENIZER_TRAINING_SHARE], VOCAB_SIZE), Path(tmp))
        tokenizer = load_tokenizer(tmp)
        result["text_mb"] = round(sum(len(t.encode()) for t in files_texts) / 1e6, 1)
        result["vocab_size"] = tokenizer.vocab_size
        for name, (inputs, texts) in inputs_and_texts.items():
            texts_json = Path(tmp, f"{name}.json")
            texts_json.write_text(json.dumps(texts))
            result[f"{name}_documents"] = len(texts)
            runs: dict[tuple[str, int], list[dict]] = {(k, n): [] for k in ("raw", "shard") for n in counts}
            for round_index in range(ROUNDS):
                for count in counts:
                    for kind in ("raw", "shard") if round_index % 2 == 0 else ("shard", "raw"):
                        if kind == "raw":
                            measured = raw_in_subprocess(texts_json, tmp, count)
                        else:
                            measured = shard_run(inputs, Path(tmp, "out"), tokenizer, count)
                        runs[kind, count].append(measured)
            result.update(summary(name, runs, counts))
    result["target_shard_vs_raw"] = TARGET
    result["load_average_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["seconds"] = round(time.perf_counter() - started, 1)
    for key, value in result.items():
        print(f"  {key}: {value:,}" if isinstance(value, int) else f"  {key}: {value}", flush=True)
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--raw"]:  # the child side of raw_in_subprocess
        print(json.dumps(raw_encode(sys.argv[2], sys.argv[3])))
    else:
        main()
    sys.exit(0)
