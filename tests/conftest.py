"""Shared fixtures: a tiny corpus, tokenizer and MDS train/val folders built once per test session.

Built with the real `modernbert-data` CLI. Under xdist every worker would build its own copy; a file
lock in the session's shared temp folder lets the first worker build it and the others reuse it.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(command: list[str], world_size: int, **env: str) -> list[subprocess.Popen]:
    """`command` as `world_size` ranks of one job on this host (RANK, WORLD_SIZE, MASTER_PORT... set), each
    with its stderr piped and Python's faulthandler on, for `wait_for_ranks`."""
    port = str(free_port())
    processes = []
    for rank in range(world_size):
        rank_env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), PYTHONFAULTHANDLER="1")
        rank_env.update(WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
        rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
        processes.append(subprocess.Popen(command, env=rank_env, cwd=REPO, stderr=subprocess.PIPE))
    return processes


def wait_for_ranks(processes: list[subprocess.Popen], timeout: float) -> list[str]:
    """Every rank's stderr once all have exited, the test failed with each one's stderr when one did not exit
    0. A rank still running after `timeout` s is aborted (faulthandler prints where each thread was: a hang
    names its place) and the test fails with every rank's stderr, not only the first rank's timeout."""
    errors: list[bytes] = [b""] * len(processes)

    def collect(i: int) -> None:
        errors[i] = processes[i].communicate()[1] or b""

    readers = [threading.Thread(target=collect, args=(i,), daemon=True) for i in range(len(processes))]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    for reader in readers:
        reader.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.poll() is None]
    for rank in hung:
        processes[rank].send_signal(signal.SIGABRT)
    for reader in readers:
        reader.join(30)
    for process in processes:
        if process.poll() is None:
            process.kill()
    texts = [error.decode(errors="replace") for error in errors]
    failed = [rank for rank, process in enumerate(processes) if process.returncode != 0]
    if hung or failed:
        told = "\n".join(
            f"---- rank {rank} (exit {processes[rank].returncode}):\n{texts[rank][-3000:]}" for rank in failed
        )
        what = f"rank(s) {hung} still running after {timeout:.0f} s" if hung else f"rank(s) {failed} failed"
        pytest.fail(f"{what}\n{told}", pytrace=False)
    return texts


def compiled_halves_unprobed():
    """`stable_adamw._compiled_halves`, its compiled functions run with every TorchDispatchMode suspended.

    The host-read probes of the tests are dispatch modes, and torch >= 2.12 refuses to run compiled code
    under one ("non-infra torch dispatch mode present": seen on 2.14, not on 2.11). The compiled halves need
    no watching: they are compiled with fullgraph=True, which refuses a graph that reads a value back (a
    read is a graph break). Set it in place of `stable_adamw._compiled_halves` (monkeypatch, or in a child).
    """
    from torch.utils._python_dispatch import _disable_current_modes

    from modernbert_train.optim import stable_adamw

    compiled_halves = stable_adamw._compiled_halves

    def unprobed(fn):
        def run(*args, **kwargs):
            with _disable_current_modes():
                return fn(*args, **kwargs)

        return run

    return lambda: tuple(unprobed(fn) for fn in compiled_halves())


# The S3 server fixtures (s3_server, s3_bucket) for every test module.
pytest_plugins = ["s3_server"]

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the small bird", "our teacher", "the farmer"]
_VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "feeds"]
_OBJECTS = ["a red ball", "the blue house", "two green apples", "the wooden boat", "a tall tree", "the river"]
_ENDINGS = ["in the morning", "after lunch", "near the lake", "every day", "with great care", "at night"]


def _documents(n: int, seed: int) -> list[str]:
    """Sentences from a small grammar: learnable, so a few hundred steps visibly lower the MLM loss."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
            for _ in range(rng.randint(1, 12))
        ]
        docs.append(" ".join(sentences).capitalize())
    return docs


def _data_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "data_prep.cli", *args], check=True, cwd=REPO, capture_output=True)


def _build(root: Path) -> None:
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for split, n, seed in (("train", 400, 0), ("val", 40, 1)):
        with (corpus / f"{split}.jsonl").open("w") as f:
            for doc in _documents(n, seed):
                f.write(json.dumps({"text": doc}) + "\n")
    _data_cli(
        "train-tokenizer",
        "--input",
        str(corpus / "train.jsonl"),
        "--output",
        str(root / "tokenizer"),
        "--vocab-size",
        "384",
    )
    for split in ("train", "val"):
        _data_cli(
            "shard",
            "--input",
            str(corpus / f"{split}.jsonl"),
            "--output",
            str(root / split),
            "--tokenizer",
            str(root / "tokenizer"),
            "--workers",
            "1",
        )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A folder with `tokenizer/`, `train/` and `val/` (MDS, each with its tokenizer.json)."""
    # Built once per session: under xdist the workers' temp folders share the session's as their parent; a
    # run without xdist has its own (that parent is /tmp/pytest-of-USER, kept across sessions and code
    # changes).
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / "tiny_data"
    with FileLock(str(shared / "tiny_data.lock")):
        if not (root / "val" / "index.json").exists():
            _build(root)
    return root


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


@pytest.fixture
def write_recipe(tmp_path, tiny_data):
    """write_recipe(path=None, **sections) -> a small CPU recipe over tiny_data, sections deep-merged in."""

    def write(path: Path | None = None, **sections) -> Path:
        recipe = {
            "run_name": "test",
            "seed": 17,
            "max_duration": "12ba",
            "global_train_batch_size": 8,
            "model": {"preset": "tiny"},
            "data": {
                "train": [{"local": str(tiny_data / "train")}],
                "eval": [{"local": str(tiny_data / "val")}],
                "max_seq_len": 64,
                "lookahead": 16,
                "eval_batch_size": 8,
            },
            "optimizer": {"lr": 3e-3},
            "scheduler": {"t_warmup": "2ba", "t_decay": "0ba"},
            "eval_interval": "6ba",
            "eval_subset_num_batches": 2,
            "log_interval": "1ba",
            "save_folder": str(tmp_path / "run"),
            "save_interval": "4ba",
            "progress_bar": False,
        }
        path = path or tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(_deep_merge(recipe, sections)))
        return path

    return write


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "modernbert_train.train", *map(str, args)]


def run_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    return {**env, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", **extra}


def run_train(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`python -m modernbert_train.train ARGS` in a subprocess; fails the test with its output if it fails."""
    done = subprocess.run(
        train_command(*args), cwd=REPO, env=run_env(**env), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"training failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    return done


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses_by_batch(path: Path) -> dict[int, float]:
    """batch -> train loss; a batch logged twice (rerun after a restart) keeps its last row."""
    return {row["batch"]: row["loss/train/total"] for row in read_metrics(path)}


# Set by launchers; a test's own subprocesses must not inherit another run's distributed settings.
_LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


# A process that holds the run lock of the folder it is given, as another run would.
HOLD = "import sys, time; from modernbert_train.train.run_lock import hold_run_lock; " \
       "hold_run_lock(sys.argv[1]).claim(); print('held', flush=True); time.sleep(300)"  # fmt: skip


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()
