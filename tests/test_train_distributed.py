"""Multi-process training on CPU (gloo) through Composer's launcher: DDP, two "nodes" on localhost, FSDP2."""

import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, losses_by_batch, read_metrics, run_env

pytestmark = pytest.mark.slow

LAUNCHER = [sys.executable, "-m", "composer.cli.launcher"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(recipe, *overrides: str) -> list[str]:
    return ["-m", "modernbert_train.train", str(recipe), *overrides]


def launch(command: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=run_env(), stdout=log, stderr=subprocess.STDOUT)


def finish(processes: list[subprocess.Popen], logs: list, timeout: float = 300) -> list[str]:
    for process in processes:
        process.wait(timeout=timeout)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read().decode(errors="replace"))
    return outputs


def test_ddp_two_processes(write_recipe, tmp_path):
    recipe = write_recipe(max_duration="6ba", data={"eval": []})
    with (tmp_path / "ddp.log").open("w+b") as log:
        process = launch([*LAUNCHER, "-n", "2", "--master_port", str(free_port()), *train_args(recipe)], log)
        (output,) = finish([process], [log])
    assert process.returncode == 0, output[-4000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["batch"] for row in rows] == list(range(1, 7))  # rank 0 alone writes
    assert all(row["samples"] == 8 * row["batch"] for row in rows)  # 4 rows per rank, counted across ranks
    assert rows[0]["trainer/device_train_microbatch_size"] == 4
    assert rows[-1]["loss/train/total"] < rows[0]["loss/train/total"]
    assert (tmp_path / "run" / "ep0-ba6-rank0.pt").exists()


def unshare_works() -> bool:
    probe = ["unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"]
    return shutil.which("unshare") is not None and subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(
    not unshare_works(),
    reason="two launchers on one host share /dev/shm, where streaming's node leaders both create the same "
    "shared-memory prefix (FileExistsError); the second 'node' needs its own /dev/shm: `unshare --mount` "
    "(root)",
)
def test_two_nodes_on_localhost(write_recipe, tmp_path):
    recipe = write_recipe(max_duration="6ba", data={"eval": []})
    port = free_port()

    def node(rank: int) -> list[str]:
        return [
            *LAUNCHER,
            "--world_size",
            "2",
            "--nproc",
            "1",
            "--node_rank",
            str(rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            *train_args(recipe),
        ]

    # Real nodes have a /dev/shm each; so must the second "node" here (see the skip reason).
    second = [
        "unshare",
        "--mount",
        "sh",
        "-c",
        'mount -t tmpfs tmpfs /dev/shm && exec "$@"',
        "node1",
        *node(1),
    ]
    with (tmp_path / "node0.log").open("w+b") as log0, (tmp_path / "node1.log").open("w+b") as log1:
        processes = [launch(node(0), log0), launch(second, log1)]
        outputs = finish(processes, [log0, log1])
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["batch"] for row in rows] == list(range(1, 7))
    assert all(row["samples"] == 8 * row["batch"] for row in rows)


def test_fsdp2_with_full_and_sharded_state_dicts(write_recipe, tmp_path):
    outputs = {}
    for state_dict_type in ("full", "sharded"):
        folder = tmp_path / state_dict_type
        recipe = write_recipe(
            tmp_path / f"{state_dict_type}.yaml",
            max_duration="4ba",
            save_interval="4ba",
            save_folder=str(folder),
            data={"eval": []},
            parallelism={"fsdp": {"state_dict_type": state_dict_type}},
        )
        with (tmp_path / f"{state_dict_type}.log").open("w+b") as log:
            process = launch(
                [*LAUNCHER, "-n", "2", "--master_port", str(free_port()), *train_args(recipe)], log
            )
            (output,) = finish([process], [log])
        assert process.returncode == 0, output[-4000:]
        outputs[state_dict_type] = losses_by_batch(folder / "metrics.jsonl")
    assert (tmp_path / "sharded" / "ep0-ba4").is_dir()
    assert outputs["full"] == pytest.approx(outputs["sharded"], rel=1e-5)
    # The optimizer stepped the sharded weights: its moments hold the gradients of every parameter. (Had
    # backward left the gradients on unsharded copies, the state would be empty until the checkpoint's
    # zero-gradient initialization.)
    checkpoint = torch.load(tmp_path / "full" / "ep0-ba4-rank0.pt", map_location="cpu", weights_only=False)
    moments = checkpoint["state"]["optimizers"]["StableAdamW"]["state"]
    assert moments and all(state["exp_avg"].abs().max() > 0 for state in moments.values())
