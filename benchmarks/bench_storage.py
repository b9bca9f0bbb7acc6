"""Object storage and many machines: `python -m benchmarks.bench_storage` (needs `make data` and moto).

1. Sharding throughput, 1 task against 2 tasks: the same text (about 4 MB of the standard library's
   sources, one document per file) sharded by one `modernbert-data shard` process, then by two processes
   at once (`--num-tasks 2`, one each) followed by `merge`; each process one tokenizer worker. Tokens per
   second of wall time, rounds alternating which goes first.
2. Packed-batch throughput streaming from the local S3 server (moto, started here on 127.0.0.1) against
   local disk: the default corpus's train shards, read by the training stream (split, mask, pack) with a
   fresh cache each round for the remote side, so every shard is downloaded. Batches per second, same
   process, rounds alternating.
Prints one JSON object with the load average; the machine is shared, so read the ratios, not the rates.
"""

import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "default"
TEXT_BYTES = 4 << 20
ROUNDS = 3
BATCHES = 40


def data_cli(*args: str, wait: bool = True):
    command = [sys.executable, "-m", "data_prep.cli", *args]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)


def text_folder(folder: Path) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for i, path in enumerate(sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)):
        if total >= TEXT_BYTES:
            break
        (folder / f"{i:05d}.py").write_bytes(path.read_bytes())
        total += path.stat().st_size
    return folder


def shard_round(text: Path, out: Path, tasks: int) -> float:
    """Seconds of wall time to shard `text` with `tasks` processes at once (and merge them)."""
    common = ["shard", "--input", str(text), "--tokenizer", str(DATA / "tokenizer"), "--workers", "1"]
    start = time.perf_counter()
    if tasks == 1:
        data_cli(*common, "--output", str(out))
    else:
        running = [
            data_cli(
                *common, "--output", str(out), "--num-tasks", str(tasks), "--task-index", str(i), wait=False
            )
            for i in range(tasks)
        ]
        for process in running:
            assert process.wait() == 0, process.stderr.read().decode()
        data_cli("merge", str(out))
    return time.perf_counter() - start


def start_s3_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        S3_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return server, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def batches_per_second(source: dict) -> float:
    from modernbert_train.data import build_dataloader, build_train_dataset
    from modernbert_train.train.data import tokenizer_info

    dataset = build_train_dataset(
        [source],
        tokenizer=tokenizer_info(DATA / "train" / "tokenizer.json"),
        max_seq_len=512,
        global_batch_size=16,
        micro_batch_size=16,
        world_size=1,
        lookahead=64,
    )
    start = time.perf_counter()
    for seen, _ in enumerate(build_dataloader(dataset), 1):
        if seen == BATCHES:
            break
    return BATCHES / (time.perf_counter() - start)


def main() -> None:
    import boto3

    from modernbert_train import storage

    results: dict = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        text = scratch / "text"
        text.mkdir()
        text_folder(text)
        tokens = None
        seconds = {1: [], 2: []}
        for r in range(ROUNDS):
            for tasks in (1, 2) if r % 2 == 0 else (2, 1):
                out = scratch / f"shards-{r}-{tasks}"
                seconds[tasks].append(shard_round(text, out, tasks))
                tokens = json.loads((out / "modernbert_data.json").read_text())["tokens"]
        best = {tasks: min(times) for tasks, times in seconds.items()}
        results["shard"] = {
            "tokens": tokens,
            "tokens_per_second_1_task": tokens / best[1],
            "tokens_per_second_2_tasks": tokens / best[2],
            "speedup_2_tasks": best[1] / best[2],
            "seconds": seconds,
        }

        server, url = start_s3_server()
        try:
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
            remote = "s3://bench/train"
            storage.upload_folder(DATA / "train", remote)
            rates = {"local": [], "s3": []}
            for r in range(ROUNDS):
                for side in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
                    if side == "local":
                        rates[side].append(batches_per_second({"local": str(DATA / "train")}))
                    else:
                        cache = scratch / f"cache-{r}"
                        rates[side].append(batches_per_second({"remote": remote, "local": str(cache)}))
        finally:
            server.terminate()
            server.wait()
        results["stream"] = {
            "batches": BATCHES,
            "rows_per_batch": 16,
            "max_seq_len": 512,
            "batches_per_second_local": max(rates["local"]),
            "batches_per_second_s3": max(rates["s3"]),
            "s3_over_local": max(rates["s3"]) / max(rates["local"]),
            "rounds": rates,
        }
    results["load_average_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
