"""How a run starts is decided on rank 0 and broadcast (train/start.py): whatever stops rank 0 there (a bad
checkpoint, or the bucket failing mid-look) stops every rank at once with the same error; the other ranks
waited for rank 0's answer until dist_timeout (NCCL), or failed naming the lost connection (gloo)."""

import subprocess
import sys
import time

from conftest import REPO, free_port, run_env

SCRIPT = """
import sys
from modernbert_train.train import start
from modernbert_train.train.config import load_config
from composer.utils import dist

def fail(config):
    raise OSError("the bucket went away while listing the save folder")

start._decide = fail
config = load_config(sys.argv[1], sys.argv[2:])
try:
    start.decide_start(config)
except Exception as e:
    print(f"rank {dist.get_global_rank()}: {type(e).__name__}: {e}", flush=True)
"""


def test_an_error_deciding_the_start_on_rank_0_stops_every_rank(write_recipe):
    recipe = write_recipe()
    port = str(free_port())
    processes = []
    began = time.monotonic()
    for rank in (0, 1):
        env = run_env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", NODE_RANK="0",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
        )  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", SCRIPT, str(recipe), "dist_timeout=120"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [process.communicate(timeout=150)[0] for process in processes]
    assert time.monotonic() - began < 100  # not dist_timeout
    for rank, output in enumerate(outputs):
        assert f"rank {rank}: OSError: the bucket went away while listing the save folder" in output, output
