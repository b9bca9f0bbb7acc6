"""Two "nodes" on localhost, each its own Composer launcher (`-n 1 --world_size 2 --node_rank R
--base_rank R`, gloo on CPU), as a cluster runs one launcher per node: the save folder shared by the nodes
(a network file system) or each node's own disk, a second run on a busy folder, and SIGTERM to one node's
launcher."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, free_port, losses_by_batch, read_metrics, run_env, start_ranks, wait_for_ranks
from test_train_distributed import rewind, unshare_works

from modernbert_train.train import run_lock
from modernbert_train.train.preemption import EXIT_PREEMPTED

two_nodes = pytest.mark.skipif(
    not unshare_works(),
    reason="the second node needs its own /dev/shm (streaming's node leaders would share one) and, for a "
    "node-local save folder, its own disk there: `unshare --mount` (root)",
)


def node(rank: int, port: int, recipe, *overrides: str, disk: tuple | None = None) -> list[str]:
    """Node `rank`'s launcher command. Node 1 runs in its own mount namespace with its own /dev/shm and, with
    `disk=(its_folder, path)`, its own folder mounted over `path` (a node-local disk under the same path)."""
    command = [
        sys.executable, "-m", "composer.cli.launcher", "-n", "1", "--world_size", "2", "--node_rank",
        str(rank), "--base_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "modernbert_train.train", str(recipe), *overrides,
    ]  # fmt: skip
    if rank == 0:
        return command
    mounts = "mount -t tmpfs tmpfs /dev/shm"
    if disk is not None:
        mounts += f" && mount --bind {disk[0]} {disk[1]}"
    return ["unshare", "--mount", "sh", "-c", f'{mounts} && exec "$@"', "node1", *command]


def start_nodes(tmp_path, name: str, recipe, *overrides: str, disk=None) -> list[subprocess.Popen]:
    """Both nodes' launchers, each in its own session (a node's processes can be signalled or killed
    together), their output in NAME.node{0,1}.log."""
    port = free_port()
    processes = []
    for rank in (0, 1):
        with (tmp_path / f"{name}.node{rank}.log").open("w") as log:
            processes.append(
                subprocess.Popen(
                    node(rank, port, recipe, *overrides, disk=disk),
                    cwd=REPO,
                    env=run_env(OMP_NUM_THREADS="1"),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return processes


def finish_nodes(processes: list[subprocess.Popen], tmp_path, name: str, timeout: float = 240) -> list[str]:
    """Both nodes' exit codes checked by the caller; their logs returned. A node still running after
    `timeout` s fails the test (and is killed with its processes)."""
    deadline = time.monotonic() + timeout
    hung = []
    for rank, process in enumerate(processes):
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(rank)
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    logs = [(tmp_path / f"{name}.node{rank}.log").read_text() for rank in (0, 1)]
    assert not hung, f"node(s) {hung} still running after {timeout:.0f} s:\n" + "\n".join(
        f"---- node {rank}:\n{log[-3000:]}" for rank, log in enumerate(logs)
    )
    return logs


@pytest.mark.slow
@two_nodes
def test_node_local_save_folders_are_refused_on_every_node(write_recipe, tmp_path):
    """Each node with its own disk under the save_folder's path: rank 0 alone would write the checkpoints
    (a sharded one: each node its ranks' files), and a resume fails on the node without them. Refused on both
    nodes before anything trains, in one line naming the node that does not see the folder."""
    folder, node1_disk = tmp_path / "run", tmp_path / "node1-disk"
    folder.mkdir()
    node1_disk.mkdir()
    recipe = write_recipe(max_duration="4ba", data={"eval": []}, autoresume=True)
    processes = start_nodes(tmp_path, "local", recipe, disk=(node1_disk, folder))
    logs = finish_nodes(processes, tmp_path, "local")
    for process, log in zip(processes, logs):
        assert process.returncode == 2, log[-3000:]
        assert f"modernbert-train: error: save_folder {folder} is not shared by the nodes: node 1 (" in log
        assert "Traceback" not in log
    assert not (folder / "metrics.jsonl").exists() and not list(folder.glob("ep*"))
    assert not list(node1_disk.iterdir())
    assert not list(folder.glob(".node-probe-*"))


@pytest.mark.slow
@two_nodes
def test_resume_on_two_nodes_sharing_the_save_folder_is_exact(write_recipe, tmp_path):
    recipe = write_recipe(max_duration="8ba", save_interval="4ba", data={"eval": []}, autoresume=True)
    folder = tmp_path / "run"
    processes = start_nodes(tmp_path, "straight", recipe)
    for process, log in zip(processes, finish_nodes(processes, tmp_path, "straight")):
        assert process.returncode == 0, log[-3000:]
    straight = losses_by_batch(folder / "metrics.jsonl")
    assert sorted(straight) == list(range(1, 9))
    assert sorted(p.name for p in folder.glob("ep*.pt")) == ["ep0-ba4-rank0.pt", "ep0-ba8-rank0.pt"]

    rewind(folder, "ep0-ba4-rank0.pt")  # as a kill right after the batch-4 checkpoint leaves it
    processes = start_nodes(tmp_path, "resumed", recipe)
    for process, log in zip(processes, finish_nodes(processes, tmp_path, "resumed")):
        assert process.returncode == 0, log[-3000:]
    rows = read_metrics(folder / "metrics.jsonl")
    assert [row["batch"] for row in rows] == list(range(1, 9))
    resumed = losses_by_batch(folder / "metrics.jsonl")
    assert resumed == pytest.approx(straight, rel=1e-6)


@pytest.mark.slow
@two_nodes
@pytest.mark.parametrize("signalled", [0, 1])
def test_sigterm_to_one_nodes_launcher_stops_both_nodes_at_one_checkpoint(write_recipe, tmp_path, signalled):
    """The launcher passes SIGTERM on to its ranks (and gives them 30 s before SIGKILL); the ranks agree on it
    at the batch's checkpoint: both nodes save the same one, exit 75, and rank 0 says where it stopped."""
    recipe = write_recipe(max_duration="100000ba", save_interval="100000ba", data={"eval": []})
    folder = tmp_path / "run"
    metrics = folder / "metrics.jsonl"
    processes = start_nodes(tmp_path, "run", recipe)
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert all(process.poll() is None for process in processes), "training ended early"
        assert time.monotonic() < deadline, "timed out waiting for training"
        time.sleep(0.05)
    processes[signalled].send_signal(signal.SIGTERM)  # the launcher's process only
    began = time.monotonic()
    logs = finish_nodes(processes, tmp_path, "run", timeout=60)
    assert time.monotonic() - began < 25  # within the launcher's 30 s: no rank was SIGKILLed
    for process, log in zip(processes, logs):
        assert process.returncode == EXIT_PREEMPTED, log[-3000:]
    stopped_at = read_metrics(metrics)[-1]["batch"]
    assert [row["batch"] for row in read_metrics(metrics)] == list(range(1, stopped_at + 1))
    assert sorted(p.name for p in folder.glob("ep*-rank0.pt")) == [f"ep0-ba{stopped_at}-rank0.pt"]
    assert os.readlink(folder / "latest-rank0.pt") == f"ep0-ba{stopped_at}-rank0.pt"
    assert f"modernbert-train: preempted: stopped at batch {stopped_at}" in logs[0]
    assert "SIGTERM: saving a checkpoint" in logs[signalled]


LOCK_ON_RANK_0 = """
import sys
from composer.utils import dist
from modernbert_train.train.run_lock import RunLockError, hold_run_lock_on_rank_0
try:
    lock = hold_run_lock_on_rank_0(sys.argv[1], dist_timeout=120)
    print(f"rank {dist.get_global_rank()}: {type(lock).__name__}", file=sys.stderr)
except RunLockError as e:
    print(f"rank {dist.get_global_rank()}: refused: {e}", file=sys.stderr)
"""


@pytest.mark.slow
def test_a_busy_save_folder_is_refused_on_every_rank(tmp_path, holder):
    """Rank 0 alone takes the lock; the other ranks (other nodes, whose launchers would not hear of rank 0's
    exit) hear of its refusal at once, rather than waiting for rank 0 at their first collective."""
    folder = tmp_path / "run"
    began = time.monotonic()
    errors = wait_for_ranks(start_ranks([sys.executable, "-c", LOCK_ON_RANK_0, str(folder)], 2), timeout=100)
    assert time.monotonic() - began < 60  # not dist_timeout
    for rank, error in enumerate(errors):
        assert f"rank {rank}: refused: save_folder {folder} is in use by another run (" in error, error
        assert f"pid {holder.pid} since" in error
    holder.kill()
    holder.wait()
    errors = wait_for_ranks(start_ranks([sys.executable, "-c", LOCK_ON_RANK_0, str(folder)], 2), timeout=100)
    assert "rank 0: RunLock" in errors[0] and "rank 1: NoneType" in errors[1], errors


@pytest.mark.slow
@two_nodes
def test_a_second_run_on_a_busy_folder_is_refused_on_both_nodes(write_recipe, tmp_path, holder):
    recipe = write_recipe(max_duration="4ba", data={"eval": []}, autoresume=True)
    # (node 1 used to fail after dist_timeout, naming a lost connection)
    processes = start_nodes(tmp_path, "second", recipe, "dist_timeout=30")
    logs = finish_nodes(processes, tmp_path, "second", timeout=120)
    for process, log in zip(processes, logs):
        assert process.returncode == 2, log[-3000:]
        assert f"modernbert-train: error: save_folder {tmp_path / 'run'} is in use by another run (" in log
    assert not list((tmp_path / "run").glob("traceback-*"))  # nothing written into the other run's folder


def test_a_save_folder_that_cannot_be_locked_is_a_warning(tmp_path, monkeypatch, capsys):
    """A cluster file system without locks (Lustre mounted without its `flock` option refuses flock with
    ENOSYS; none here, so that refusal stands in): one warning naming the lock file, and no lock."""

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    assert run_lock.hold_run_lock(tmp_path / "run") is None
    warning = (
        f"modernbert-train: warning: {tmp_path / 'run' / '.lock'} cannot be locked (Function not implemented)"
    )
    assert warning in capsys.readouterr().err
