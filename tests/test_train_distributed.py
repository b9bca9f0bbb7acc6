"""Multi-process training on CPU (gloo) through Composer's launcher: DDP, two "nodes" on localhost, FSDP2."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, free_port, losses_by_batch, read_metrics, run_env

from modernbert_train.train.checkpoint_files import sha256

pytestmark = pytest.mark.slow

LAUNCHER = [sys.executable, "-m", "composer.cli.launcher"]


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


def test_evaluation_on_two_ranks_scores_every_labelled_token_once(write_recipe, tmp_path, tiny_data):
    """A full evaluation gives two ranks the metrics one process gets. 39 documents: streaming's partition
    pads the ranks' parts to one count by repeating a document (scored twice), and the ranks pack their
    parts into different numbers of batches, where Composer stops every rank at the first one out (the
    others' last batches unscored); with workers, each rank's part is split again."""
    metrics = {}
    for ranks, workers in ((1, 0), (2, 2)):
        recipe = write_recipe(
            tmp_path / f"recipe-{ranks}.yaml",
            max_duration="2ba",
            eval_interval="1ba",  # after the first batch, trained at lr 0 (the warmup's): one model on both
            eval_subset_num_batches=-1,
            save_folder=str(tmp_path / f"run-{ranks}"),
            save_interval="100ba",
            data={"eval": [{"local": str(tiny_data / "val"), "choose": 39}], "num_workers": workers},
        )
        launcher = [*LAUNCHER, "-n", "2", "--master_port", str(free_port())]
        command = launcher if ranks == 2 else [sys.executable]
        with (tmp_path / f"{ranks}.log").open("w+b") as log:
            process = launch([*command, *train_args(recipe)], log)
            (output,) = finish([process], [log])
        assert process.returncode == 0, output[-4000:]
        rows = read_metrics(tmp_path / f"run-{ranks}" / "metrics.jsonl")
        (row,) = [row for row in rows if "metrics/eval/MLMLoss" in row and row["batch"] == 1]
        metrics[ranks] = (row["metrics/eval/MLMLoss"], row["metrics/eval/MLMAccuracy"])
    # Equal to float rounding (the ranks sum in another order); a document scored twice or a batch left out
    # moved the loss by 2e-5 (relative) on an untrained model.
    assert metrics[2] == pytest.approx(metrics[1], rel=1e-6, abs=0), metrics


def test_fsdp2_gradients_match_ddp(write_recipe, tmp_path):
    """The same global batch gives DDP and FSDP2 the same gradient norm and loss: FSDP2 averages over the
    ranks (gloo in torch 2.7 runs its reduce-scatter AVG as a SUM: twice DDP's norm, see train/fsdp_grads.py),
    and the batch's loss is the mean over its labelled tokens whatever the micro-batches (FSDP2 splits
    each rank's 4 rows into 2 + 2, DDP does not split)."""

    def start(name: str, log, **sections) -> subprocess.Popen:
        recipe = write_recipe(
            tmp_path / f"{name}.yaml", max_duration="2ba", save_folder=str(tmp_path / name),
            save_interval="100ba", data={"eval": []}, grad_clip_norm=0.5, **sections,
        )  # fmt: skip
        # (clipping too: FSDP2's in each rank's shards, by the global norm)
        return launch([*LAUNCHER, "-n", "2", "--master_port", str(free_port()), *train_args(recipe)], log)

    with (tmp_path / "ddp.log").open("w+b") as ddp_log, (tmp_path / "fsdp.log").open("w+b") as fsdp_log:
        processes = [
            start("ddp", ddp_log, device_train_microbatch_size=4),
            start("fsdp", fsdp_log, device_train_microbatch_size=2, parallelism={"fsdp": {}}),
        ]
        for process, output in zip(processes, finish(processes, [ddp_log, fsdp_log])):
            assert process.returncode == 0, output[-4000:]
    ddp, fsdp = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("ddp", "fsdp"))
    assert [row["batch"] for row in ddp] == [row["batch"] for row in fsdp] == [1, 2]
    for name in ("train/grad_norm", "loss/train/total", "tokens"):
        assert [row[name] for row in fsdp] == pytest.approx([row[name] for row in ddp], rel=1e-5), name


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


def rewind(folder, to: str) -> None:
    """Make `to` the latest checkpoint, as a kill right after writing it would have left the folder."""
    for later in folder.glob("ep*"):
        if later.name != to:
            shutil.rmtree(later) if later.is_dir() else later.unlink()
    (folder / "latest-rank0.pt").unlink()
    (folder / "latest-rank0.pt").symlink_to(to)


@pytest.mark.timeout(1800)  # four 2-process runs: minutes on a loaded 2-core machine
def test_fsdp2_resume_is_exact_with_full_and_sharded_state_dicts(write_recipe, tmp_path):
    """A straight run (full state dicts) and, beside it, a sharded run SIGKILLed after its batch-4 checkpoint;
    then the sharded run restarted with the same command and, beside it, the straight run rewound to its
    batch-4 checkpoint and restarted. All agree batch by batch: the resumed runs found the same weights,
    moments, schedule and data stream. (Two runs at a time: half the wall time of one after the other.)"""

    def start(state_dict_type: str, log, **popen) -> subprocess.Popen:
        recipe = write_recipe(
            tmp_path / f"{state_dict_type}.yaml",
            max_duration="8ba",
            save_interval="4ba",
            autoresume=True,
            save_folder=str(tmp_path / state_dict_type),
            data={"eval": []},
            parallelism={"fsdp": {"state_dict_type": state_dict_type}},
            # the sharded run keeps its newest checkpoint only, the killed attempt's counted too
            save_num_checkpoints_to_keep=1 if state_dict_type == "sharded" else -1,
        )
        command = [*LAUNCHER, "-n", "2", "--master_port", str(free_port()), *train_args(recipe)]
        return subprocess.Popen(
            command, cwd=REPO, env=run_env(), stdout=log, stderr=subprocess.STDOUT, **popen
        )

    def finish_all(processes: list[subprocess.Popen], logs: list) -> None:
        for process, output in zip(processes, finish(processes, logs, timeout=900)):
            assert process.returncode == 0, output[-4000:]

    full, sharded = tmp_path / "full", tmp_path / "sharded"
    with (tmp_path / "full.log").open("w+b") as full_log, (tmp_path / "killed.log").open("w+b") as killed_log:
        straight_run = start("full", full_log)
        # its own session: the kill takes the launcher and both ranks at once, as a lost node does
        killed = start("sharded", killed_log, start_new_session=True)
        deadline = time.monotonic() + 600
        while not (sharded / "latest-rank0.pt").is_symlink() and killed.poll() is None:
            assert time.monotonic() < deadline, "timed out waiting for the batch-4 checkpoint"
            time.sleep(0.05)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        finish_all([straight_run], [full_log])
    assert (sharded / "ep0-ba4").is_dir() and not (sharded / "ep0-ba8").exists()
    straight = losses_by_batch(full / "metrics.jsonl")
    assert sorted(straight) == list(range(1, 9))
    # The optimizer stepped the sharded weights: its moments hold the gradients of every parameter. (Had
    # backward left the gradients on unsharded copies, the state would be empty until the checkpoint's
    # zero-gradient initialization.)
    checkpoint = torch.load(full / "ep0-ba8-rank0.pt", map_location="cpu", weights_only=False)
    moments = checkpoint["state"]["optimizers"]["StableAdamW"]["state"]
    assert moments and all(state["exp_avg"].abs().max() > 0 for state in moments.values())
    grad_norms = {row["batch"]: row["train/grad_norm"] for row in read_metrics(full / "metrics.jsonl")}

    rewind(full, "ep0-ba4-rank0.pt")
    with (tmp_path / "full2.log").open("w+b") as full_log, (tmp_path / "sharded.log").open("w+b") as log:
        finish_all([start("full", full_log), start("sharded", log)], [full_log, log])
    resumed_full = losses_by_batch(full / "metrics.jsonl")
    resumed_sharded = losses_by_batch(sharded / "metrics.jsonl")
    assert sorted(resumed_sharded) == sorted(resumed_full) == list(range(1, 9))
    for batch, loss in straight.items():
        assert resumed_full[batch] == pytest.approx(loss, rel=1e-6), f"full, batch {batch}"
        assert resumed_sharded[batch] == pytest.approx(loss, rel=1e-5), f"sharded, batch {batch}"
    # the gradient norm over FSDP's shards, logged every batch, the same whichever state dicts are saved
    sharded_norms = {row["batch"]: row["train/grad_norm"] for row in read_metrics(sharded / "metrics.jsonl")}
    assert all(0 < norm < float("inf") for norm in grad_norms.values())
    assert sharded_norms == pytest.approx(grad_norms, rel=1e-4)
    # the resumed sharded run's checkpoint has every file's checksum recorded beside it
    recorded = dict(line.split("  ")[::-1] for line in (sharded / "ep0-ba8.sha256").read_text().splitlines())
    files = sorted(p.relative_to(sharded / "ep0-ba8").as_posix() for p in (sharded / "ep0-ba8").rglob("*"))
    assert sorted(recorded) == files and ".metadata" in files and len(files) >= 3
    assert all(recorded[name] == sha256(sharded / "ep0-ba8" / name) for name in files)
    # the killed attempt's ep0-ba4 went whole, with its checksums, once ep0-ba8 was complete
    assert sorted(p.name for p in sharded.glob("ep*")) == ["ep0-ba8", "ep0-ba8.sha256"]
    assert os.readlink(sharded / "latest-rank0.pt") == "ep0-ba8"


@pytest.mark.timeout(1800)
def test_resume_on_another_world_size(write_recipe, tmp_path):
    """1 process to batch 3, then 2 processes to batch 6, then 1 again to batch 9 (DDP, autoresume): the
    global batch stays 8 rows, each change logs what it skipped, and the run trains on."""
    recipe = write_recipe(save_interval="3ba", autoresume=True, data={"eval": []})
    logs = []
    for processes, until in ((1, 3), (2, 6), (1, 9)):
        command = [*LAUNCHER, "-n", str(processes), "--master_port", str(free_port())]
        with (tmp_path / f"to{until}.log").open("w+b") as log:
            process = launch([*command, *train_args(recipe, f"max_duration={until}ba")], log)
            (output,) = finish([process], [log], timeout=900)
        assert process.returncode == 0, output[-4000:]
        logs.append(output)
    assert "resuming on 2 rank(s) a stream saved by 1 rank(s)" in logs[1]
    assert "resuming on 1 rank(s) a stream saved by 2 rank(s)" in logs[2]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["batch"] for row in rows] == list(range(1, 10))
    assert all(row["samples"] == 8 * row["batch"] for row in rows)
    assert rows[-1]["loss/train/total"] < rows[0]["loss/train/total"]
