"""`make device-check` without a GPU: the dry run (tiny preset) runs every stage and writes its result."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_env

from benchmarks.device_check import HEADLINE, flash_attention_impls, report, wheel_distribution


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
    assert result["environment"]["host_cpus"] > 0 and "flash_attention_impls" in result["environment"]
    assert "== lscpu" in (tmp_path / "env.txt").read_text()
    assert all(run["status"] == "ok" and run["labelled_tokens_per_step"] > 0 for run in result["runs"])
    # and the training configuration once more at a larger micro-batch (96 rows on a GPU)
    assert sorted(run["rows_per_step"] for run in result["runs"]) == [4] * len(result["runs"][1:]) + [8]
    assert result["rows_per_step"] in (4, 8) and " eager 8 rows: ok" in done.stdout
    # The training configuration's run also times the optimizer implementations against each other.
    [compared] = [run["optimizers"] for run in result["runs"] if run.get("optimizers")]
    assert compared["ratio"] > 0 and compared["ratio_read_loss"] > 0 and compared["foreach_read_loss_s"] > 0
    assert compared["ratio_composer"] > 0 and compared["foreach_flag_s"] > 0
    # its own stage: foreach compiled among them
    assert result["optimizers"]["status"] == "ok" and result["optimizers"]["ratio_compiled"] > 0
    assert "foreach compiled / eager" in done.stdout
    assert "optimizer foreach/optimi step time" in done.stdout
    train = result["train"]
    assert (train["status"], train["batches"], train["model"], train["seq_len"]) == ("ok", 4, "tiny", 128)
    assert train["tokens_per_second_per_gpu"] > 0
    assert train["profile"]["batches"] == [3, 4] and train["profile"]["wall_ms_per_step"] > 0
    assert "profiled batches 3-4: " in done.stdout
    assert result["tests"]["status"] == "ok" and result["tests"]["tests"] > 0
    versus = result["versus_transformers"]
    assert versus["status"] == "ok" and set(versus["shapes"]) == {"fixed", "variable"}
    for entry in versus["shapes"].values():
        assert entry["theirs_best"] == "theirs_sdpa_eager" and entry["speedup_ours_eager_vs_theirs_best"] > 0
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
    assert result["versus_transformers"] == {"status": "not run"}


def test_versus_transformers_same_loss_and_a_ratio(tmp_path):
    """benchmarks.bench_hf_gpu's dry run: the same weights give transformers' loss (fp32 on a CPU, to 1e-4),
    every configuration is timed and the ratio is against transformers' fastest."""
    from benchmarks import bench_hf_gpu

    out = tmp_path / "vs-hf.json"
    argv = ["--device", "cpu", "--preset", "tiny", "--seq-len", "64", "--rows", "2", "--rounds", "2",
            "--warmup", "1", "--eager-only", "--output", str(out)]  # fmt: skip
    assert bench_hf_gpu.main(argv) == 0
    result = json.loads(out.read_text())
    for shape, entry in result["shapes"].items():
        configs = entry["configs"]
        assert set(configs) == {"ours_eager", "theirs_sdpa_eager"}, shape
        for record in configs.values():
            assert record["status"] == "ok" and record["loss_gap_vs_ours_eager"] < 1e-4
            assert len(record["step_times_s"]) == 2 and record["tokens_per_s"] > 0
        ratio = configs["theirs_sdpa_eager"]["median_step_s"] / configs["ours_eager"]["median_step_s"]
        assert entry["speedup_ours_eager_vs_theirs_best"] == round(ratio, 3)
    assert result["shapes"]["variable"]["real_tokens"] < result["shapes"]["fixed"]["real_tokens"] == 128


def test_profile_counts_each_kernel_once():
    """The profile's total is the sum of what it ranks, grouped by family; on a CPU, operators."""
    import torch

    from benchmarks.bench_gpu import profile_steps
    from modernbert_train.profiling import kernel_kind

    a = torch.randn(64, 64)
    profile = profile_steps(lambda: (a @ a).relu_().sum(), steps=2, cuda=False, top=5)
    by_kind = sum(kind["ms_per_step"] for kind in profile["by_kind"].values())
    assert abs(by_kind - profile["total_ms_per_step"]) < 1e-6 and profile["device_idle_share"] is None
    assert kernel_kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kernel_kind("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>") == "attention"
    assert kernel_kind("triton_poi_fused_cat_gelu_gelu_backward_mul_split_2") == "fused (triton)"


def test_wheel_names_map_to_distributions():
    assert wheel_distribution(Path("ruamel_yaml-0.19.1-py3-none-any.whl")) == "ruamel-yaml"
    assert wheel_distribution(Path("torch_optimi-0.3.3-py3-none-any.whl")) == "torch-optimi"


def test_flash_attention_implementations_are_tried_and_put_back():
    """Each implementation torch registers (torch 2.11: FA3 and FA4, by name on any machine) is reported as
    activating here or with the provider's error in one line; torch is left on its built-in FA2."""
    import torch.nn.attention as attention

    found = flash_attention_impls()
    if not hasattr(attention, "list_flash_attention_impls"):
        assert found is None  # torch 2.7
        return
    assert set(found) == set(attention.list_flash_attention_impls())
    assert all(v == "activates" or ("Error" in v and "\n" not in v) for v in found.values())
    assert attention.current_flash_attention_impl() is None
