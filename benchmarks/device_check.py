"""The Python half of `benchmarks/device_check.sh` (`make device-check`).

    python -m benchmarks.device_check install-wheels WHEELHOUSE TARGET
    python -m benchmarks.device_check env WORK OUT
    python -m benchmarks.device_check report WORK OUT --budget S --elapsed S

`install-wheels` puts the wheels whose distribution is not installed yet into TARGET (no index, no
dependencies: the wheelhouse is the whole closure the GPU image lacks). `env` records the machine in
OUT/env.txt and WORK/env.json (with the result's file name), and writes WORK/env.sh for the script (the
device kind, the backends that can train here). `report` gathers what the stages left in WORK into the
result JSON, rewritten after every stage so that a check cut short still leaves one. Only `env` imports
torch.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from benchmarks.devices import device_slug, package_version, peak_flops

RESULTS = Path(__file__).parent / "results"
# The top-level keys of a result (DESIGN.md); they describe the fastest benchmark configuration.
HEADLINE = ("device", "mfu", "tokens_per_second_per_gpu", "seq_len", "rows_per_step", "model", "torch",
            "attention_backend")  # fmt: skip


def wheel_distribution(wheel: Path) -> str:
    """'ruamel.yaml-0.18.6-py3-none-any.whl' -> 'ruamel-yaml' (normalised as in PEP 503)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def install_wheels(wheelhouse: Path, target: Path) -> int:
    wheels = sorted(wheelhouse.glob("*.whl"))
    if not wheels:
        print(
            f"device_check: error: no wheels in {wheelhouse}; fill it with `make wheelhouse`", file=sys.stderr
        )
        return 2
    missing = [w for w in wheels if not installed(wheel_distribution(w))]
    print(f"{len(wheels) - len(missing)} of {len(wheels)} wheels already installed")
    if not missing:
        return 0
    print("installing into", target, ":", " ".join(w.name for w in missing), flush=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target"]
    return subprocess.call([*command, str(target), *map(str, missing)])


def flash_attention_impls() -> dict | None:
    """torch's flash-attention implementations besides its built-in FA2 (newer torch: FA3, FA4), each with
    whether it activates here. torch 2.11 registers them by name on any machine; activating one imports its
    provider package (FA3's flash_attn_interface, FA4's flash_attn), which an image may lack. Tried in this
    process only (the env stage's), and put back to FA2 after."""
    import torch.nn.attention as attention

    if not hasattr(attention, "list_flash_attention_impls"):
        return None
    found = {}
    for impl in attention.list_flash_attention_impls():
        try:
            attention.activate_flash_attention_impl(impl)
            found[impl] = "activates"
        except Exception as e:  # the provider's import error, as a line
            found[impl] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    if getattr(attention, "current_flash_attention_impl", lambda: None)() is not None:
        attention.restore_flash_attention_impl()
    return found


def describe_machine(work: Path, out: Path) -> int:
    import torch

    from modernbert_train.model.attention import available_backends, resolve_backend

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{
            name: package_version(name)
            for name in ("triton", "transformers", "mosaicml", "mosaicml-streaming")
        },
        "device": "cpu",
        "date": datetime.date.today().isoformat(),
        "backends": available_backends(device, dropout=False, backward=True),
        "auto_backend": resolve_backend("auto", device, dropout=False, backward=True),
        # Flash-attention kernels other than the built-in FA2 that torch could switch its flash path to
        # (torch.nn.attention.activate_flash_attention_impl): the attention kernels are about a quarter of
        # base's step. None with a torch that has no such registry.
        "flash_attention_impls": flash_attention_impls(),
        "host_cpus": os.cpu_count(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            peak_flops=peak_flops(props.name),
        )
    # The CPU dry run must not take the name of `make bench`'s benchmarks/results/cpu-<date>.json.
    slug = device_slug(env["device"]) if cuda else "device-check-cpu"
    env["result_name"] = f"{slug}-{env['date']}.json"
    (work / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    (work / "env.sh").write_text(
        f"DEVICE_KIND={device.type}\n"
        f"AUTO_BACKEND={env['auto_backend']}\n"
        f"BACKENDS={shlex.quote(' '.join(env['backends']))}\n"
    )

    distributions = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    lines = [json.dumps(env, indent=2), "", "== installed distributions (sys.path)", *distributions]
    # The host's CPUs: every launch and the optimizer's multi-tensor calls run there while the GPU waits.
    if shutil.which("lscpu"):
        lines += ["", "== lscpu", subprocess.run(["lscpu"], capture_output=True, text=True).stdout]
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
            lines += ["", "== nvidia-smi", smi.stdout + smi.stderr]
        except subprocess.TimeoutExpired:
            lines += ["", "== nvidia-smi did not answer in 30 s"]
    (out / "env.txt").write_text("\n".join(lines) + "\n")
    print(json.dumps(env, indent=2))
    return 0


def read_jsonl(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def log_tail(work: Path, stage: str, lines: int = 8) -> str:
    """The end of a stage's output: why it failed, usually."""
    path = work / "logs" / f"{stage}.log"
    text = path.read_text(errors="replace").strip() if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def test_summary(work: Path, stage: dict | None) -> dict:
    summary = {"status": stage["status"] if stage else "not run"}
    path = work / "tests.xml"
    if not path.is_file():
        return summary
    suite = ElementTree.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {**summary, **counts, "passed": counts["tests"] - counts["failures"] - counts["errors"]
            - counts["skipped"], "failed_tests": failed}  # fmt: skip


def bench_runs(work: Path, stages: dict[str, dict]) -> list[dict]:
    runs = []
    for name, stage in stages.items():
        if not name.startswith("bench-"):
            continue
        _, backend, mode = name.split("-", 2)  # mode: eager|compiled, then -rROWS for another micro-batch
        path = work / "bench" / f"{backend}-{mode}.json"
        if stage["status"] == "ok" and path.is_file():
            runs.append({"status": "ok", "seconds": stage["seconds"], **json.loads(path.read_text())})
        else:
            runs.append(
                {
                    "attention_backend": backend,
                    "compile": mode.split("-")[0] == "compiled",
                    **stage,
                    "error": log_tail(work, name),
                }
            )
    return runs


def train_summary(work: Path, stage: dict | None, env: dict) -> dict:
    summary = {"status": stage["status"] if stage else "not run", "seconds": stage and stage["seconds"]}
    config_path = work / "train" / "config.yaml"
    if config_path.is_file():
        import yaml

        config = yaml.safe_load(config_path.read_text())
        summary.update(
            model=config["model"]["preset"],
            seq_len=config["data"]["max_seq_len"],
            global_train_batch_size=config["global_train_batch_size"],
            precision=config["precision"],
            compile=config["model"]["compile"],
            attention_backend=config["model"]["attn_backend"],
            max_duration=config["max_duration"],
        )
    rows = read_jsonl(work / "train" / "metrics.jsonl")
    profile = work / "train" / "profile.json"
    if profile.is_file():  # whole Composer batches (the `profile` key), beside the bench's step profile
        summary["profile"] = json.loads(profile.read_text())
    if stage and stage["status"] != "ok":
        summary["error"] = log_tail(work, "train")
    if not rows:
        return summary
    last = rows[-1]
    # The last row's throughput is SpeedMonitor's window over the final batches, compilation long done
    # (the average since the start when the run was shorter than the window).
    tokens_per_second = last.get("throughput/device/tokens_per_sec", last.get("throughput/tokens_per_sec"))
    flops_per_second = last.get("throughput/device/flops_per_sec")
    peak = env.get("peak_flops")
    summary.update(
        batches=last["batch"],
        loss_first=rows[0]["loss/train/total"],
        loss_last=last["loss/train/total"],
        tokens_per_second_per_gpu=tokens_per_second,
        model_tflops=flops_per_second / 1e12 if flops_per_second else None,
        mfu=flops_per_second / peak if flops_per_second and peak else None,
        composer_mfu=last.get("throughput/device/mfu"),
    )
    return summary


def optimizer_comparison(work: Path, stage: dict | None) -> dict:
    """The optimizers stage: the StableAdamW implementations timed on the training configuration's step,
    foreach compiled (`optimizer.compile`) among them (benchmarks.bench_gpu --with-compiled-optimizer)."""
    if stage is None:
        return {"status": "not run"}
    path = work / "optimizers.json"
    found = json.loads(path.read_text()).get("optimizers") if path.is_file() else None
    summary = {"status": stage["status"], "seconds": stage["seconds"]}
    if not found:
        summary["error"] = log_tail(work, "optimizers")
        return summary
    return {**summary, **found}


def versus_hf(work: Path, stage: dict | None) -> dict:
    """The vs-hf stage: our step against transformers' at its best, per shape (benchmarks.bench_hf_gpu)."""
    if stage is None:
        return {"status": "not run"}
    path = work / "vs-hf.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    summary = {"status": stage["status"], "seconds": stage["seconds"]}
    if not found:
        summary["error"] = log_tail(work, "vs-hf")
        return summary
    summary.update(
        {key: found[key] for key in ("model", "rows", "seq_len", "theirs", "call") if key in found}
    )
    summary["shapes"] = found.get("shapes", {})
    return summary


def report(work: Path, out: Path, budget: int, elapsed: int) -> dict:
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    stages = {row["stage"]: row for row in read_jsonl(work / "stages.jsonl")}
    runs = bench_runs(work, stages)
    measured = [run for run in runs if run["status"] == "ok"]
    best = max(measured, key=lambda run: run["tokens_per_second_per_gpu"], default={})
    result = {
        **{key: best.get(key, env.get(key)) for key in HEADLINE},
        "compile": best.get("compile"),
        "date": env.get("date", datetime.date.today().isoformat()),
        "environment": env,
        "check": {
            "budget_s": budget,
            "elapsed_s": elapsed,
            "problems": [name for name, stage in stages.items() if stage["status"] != "ok"],
            "stages": list(stages.values()),
        },
        "tests": test_summary(work, stages.get("tests")),
        "runs": runs,
        "train": train_summary(work, stages.get("train"), env),
        "versus_transformers": versus_hf(work, stages.get("vs-hf")),
        "optimizers": optimizer_comparison(work, stages.get("optimizers")),
    }
    # Until `env` has named the device there is nothing to file the result under.
    if "result_name" in env:
        text = json.dumps(result, indent=2) + "\n"
        (out / env["result_name"]).write_text(text)
        if env["device"] != "cpu" and measured:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / env["result_name"]).write_text(text)
    return result


def print_summary(result: dict) -> None:
    def figures(run: dict) -> str:
        """Throughput, MFU, median step, compile time and memory, where measured."""
        parts = [("tokens_per_second_per_gpu", "{:,.0f} tok/s"), ("mfu", "MFU {:.3f}"),
                 ("median_step_s", "step {:.4f} s"), ("compile_s", "compile {:.0f} s"),
                 ("peak_memory_gib", "{:.1f} GiB")]  # fmt: skip
        return "  ".join(spec.format(run[key]) for key, spec in parts if run.get(key) is not None)

    print(f"device {result['device']}, torch {result['torch']}")
    for run in result["runs"]:
        mode = "compiled" if run["compile"] else "eager"
        rows = f" {run['rows_per_step']} rows" if run.get("rows_per_step") else ""
        print(f"  bench {run['attention_backend']} {mode}{rows}: {run['status']}  {figures(run)}")
        optimizers = run.get("optimizers")
        if optimizers:
            composer = optimizers.get("ratio_composer")  # absent from results before 2026-12-07
            print(
                f"    optimizer foreach/optimi step time: {optimizers['ratio']:.3f}, with a read before the "
                f"step {optimizers['ratio_read_loss']:.3f}"
                + (
                    f", as a Composer batch takes each (foreach: the guard's flag, optimi: its read) "
                    f"{composer:.3f}"
                    if composer
                    else ""
                )
            )
    train = result["train"]
    loss = f"loss {train['loss_first']:.3f} -> {train['loss_last']:.3f}" if "loss_last" in train else ""
    print(f"  train: {train['status']}  {train.get('batches', 0)} batches  {figures(train)}  {loss}")
    profile = train.get("profile")
    if profile:
        idle = profile["device_idle_share"]
        print(
            f"    profiled batches {profile['batches'][0]}-{profile['batches'][1]}: "
            f"{profile['wall_ms_per_step']:.1f} ms per batch"
            + (f", device idle {idle:.0%}" if idle is not None else "")
            + f", {profile['host_reads_per_step']:.0f} host reads per batch"
        )
    versus = result.get("versus_transformers", {})
    for shape, entry in versus.get("shapes", {}).items():
        speedups = "  ".join(
            f"{key.removeprefix('speedup_').removesuffix('_vs_theirs_best')} {value:.2f}x"
            for key, value in entry.items()
            if key.startswith("speedup_")
        )
        best = entry.get("theirs_best", "none timed")
        print(f"  vs transformers ({shape}): {speedups or 'no ratio'}  (theirs best: {best})")
    if versus.get("status") not in (None, "ok", "not run") or "error" in versus:
        print(f"  vs transformers: {versus.get('status')}")
    optimizers = result.get("optimizers", {})
    if "ratio_compiled" in optimizers:
        print(
            f"  optimizers: foreach (the guard's flag) / optimi (a read before its step) "
            f"{optimizers['ratio_composer']:.3f}, foreach compiled / eager {optimizers['ratio_compiled']:.3f}"
        )
    elif optimizers.get("status") not in (None, "not run"):
        print(f"  optimizers: {optimizers.get('status')}")
    tests = result["tests"]
    counts = (
        tests.get("passed", 0),
        tests.get("failures", 0) + tests.get("errors", 0),
        tests.get("skipped", 0),
    )
    print(f"  tests: {tests['status']}  {'{} passed, {} failed, {} skipped'.format(*counts)}")
    problems = result["check"]["problems"]
    print(f"  problems: {', '.join(problems) if problems else 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.device_check", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    wheels = commands.add_parser("install-wheels")
    wheels.add_argument("wheelhouse", type=Path)
    wheels.add_argument("target", type=Path)
    for name in ("env", "report"):
        command = commands.add_parser(name)
        command.add_argument("work", type=Path)
        command.add_argument("out", type=Path)
    commands.choices["report"].add_argument("--budget", type=int, required=True)
    commands.choices["report"].add_argument("--elapsed", type=int, required=True)
    commands.choices["report"].add_argument("--print", action="store_true", help="print a summary")
    args = parser.parse_args(argv)
    if args.command == "install-wheels":
        return install_wheels(args.wheelhouse, args.target)
    if args.command == "env":
        return describe_machine(args.work, args.out)
    result = report(args.work, args.out, args.budget, args.elapsed)
    if args.print:
        print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
