"""`make device-check` without a GPU: the dry run (tiny preset) runs every stage and writes its result."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_env

from benchmarks.device_check import HEADLINE, report, wheel_distribution


@pytest.mark.slow
def test_cpu_dry_run_writes_the_result(tmp_path):
    results_before = sorted((REPO / "benchmarks" / "results").iterdir())
    done = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "device-check",
            f"OUT={tmp_path}",
            f"DEVICE_CHECK_PYTHON={sys.executable}",
        ],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-3000:]}"

    [path] = tmp_path.glob("device-check-cpu-*.json")
    assert {p.name for p in tmp_path.iterdir()} == {
        path.name, "device-check.log", "stages.log", "env.txt", "metrics.jsonl"
    }  # fmt: skip
    result = json.loads(path.read_text())
    assert set(HEADLINE) <= result.keys()
    assert (result["device"], result["model"], result["seq_len"]) == ("cpu", "tiny", 128)
    assert result["tokens_per_second_per_gpu"] > 0 and result["mfu"] is None  # no peak FLOP/s for a CPU
    assert result["check"]["problems"] == []
    assert {run["attention_backend"] for run in result["runs"]} == set(result["environment"]["backends"])
    assert all(run["status"] == "ok" and run["labelled_tokens_per_step"] > 0 for run in result["runs"])
    train = result["train"]
    assert (train["status"], train["batches"], train["model"], train["seq_len"]) == ("ok", 4, "tiny", 128)
    assert train["tokens_per_second_per_gpu"] > 0
    assert result["tests"]["status"] == "ok" and result["tests"]["tests"] > 0
    # The dry run leaves the committed results alone (cpu-<date>.json there is `make bench`'s).
    assert sorted((REPO / "benchmarks" / "results").iterdir()) == results_before


def test_report_of_a_check_cut_short(tmp_path):
    """Stages that failed, timed out or never ran are reported; the fastest measured run is the headline."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "bench").mkdir(parents=True)
    (work / "logs").mkdir()
    out.mkdir()
    env = {
        "device": "cpu",
        "torch": "2.7.0",
        "date": "2026-11-27",
        "result_name": "device-check-cpu-2026-11-27.json",
    }
    (work / "env.json").write_text(json.dumps(env))
    stages = [("bench-sdpa-eager", "ok"), ("bench-flex-eager", "ok"), ("bench-sdpa-compiled", "failed"),
              ("train", "timeout")]  # fmt: skip
    (work / "stages.jsonl").write_text(
        "".join(
            json.dumps({"stage": s, "status": st, "seconds": 5, "exit_code": 0}) + "\n" for s, st in stages
        )
    )
    for backend, speed in (("sdpa", 300.0), ("flex", 200.0)):
        run = {"device": "cpu", "model": "tiny", "seq_len": 128, "torch": "2.7.0", "mfu": None,
               "attention_backend": backend, "compile": False,
               "tokens_per_second_per_gpu": speed}  # fmt: skip
        (work / "bench" / f"{backend}-eager.json").write_text(json.dumps(run))
    (work / "logs" / "bench-sdpa-compiled.log").write_text("compiling\nbench_gpu: error: compiled again\n")

    result = report(work, out, budget=60, elapsed=61)
    assert json.loads((out / "device-check-cpu-2026-11-27.json").read_text()) == result
    assert (result["attention_backend"], result["tokens_per_second_per_gpu"]) == ("sdpa", 300.0)
    assert result["check"]["problems"] == ["bench-sdpa-compiled", "train"]
    failed = next(run for run in result["runs"] if run["status"] == "failed")
    assert failed["compile"] is True and failed["error"].endswith("bench_gpu: error: compiled again")
    assert result["train"]["status"] == "timeout" and result["tests"]["status"] == "not run"


def test_wheel_names_map_to_distributions():
    assert wheel_distribution(Path("ruamel_yaml-0.19.1-py3-none-any.whl")) == "ruamel-yaml"
    assert wheel_distribution(Path("torch_optimi-0.3.3-py3-none-any.whl")) == "torch-optimi"
