"""Training throughput and MFU of the model alone (no data loading): `python -m benchmarks.bench_gpu`.

A packed batch (rows of `seq_len` tokens holding documents of mixed lengths, 30% labelled) goes through
forward, backward and a StableAdamW step under bf16 autocast, called as in pretraining (the labelled
positions given, the chunked cross-entropy without logits). `--compile` compiles each encoder layer as
`model.compile: true` does in training. MFU counts the FLOPs that run: every token through the encoder,
the labelled ones through the head and decoder (`model.training_flops`).

Results go to `benchmarks/results/<device>-<date>.json` (or `--output FILE`) with `device`, `mfu`,
`tokens_per_second_per_gpu`, `seq_len`, `model`, `torch`, `attention_backend`, the median step, the
first step (compile included), peak memory and the versions. A compiled step that compiles again after
the first fails the benchmark (exit 3) with dynamo's reason. `--device cpu --preset tiny` runs the same
code on a CPU (fp32) as a check; its result is printed, and written only with `--output`.

`--compare-optimizers R` then times the StableAdamW implementations (`optimizer.impl`: optimi's Triton
kernels, our multi-tensor step) on the same model and batch, in R alternating rounds, each both as this
benchmark steps and as a Composer batch does: with the loss read back to the host between backward and the
optimizer step (Composer's closure and the non-finite guard both read it), so the optimizer's launches can no
longer hide behind the backward's kernels. `optimizers` in the result has each median and the ratios.
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.devices import device_slug, package_version, peak_flops
from modernbert_train.model import ModelConfigError, ModernBertConfig, ModernBertForMaskedLM, training_flops
from modernbert_train.model.attention import resolve_backend
from modernbert_train.optim import build_optimizer
from modernbert_train.profiling import summarize, table

RESULTS = Path(__file__).parent / "results"


def packed_batch(rows: int, seq_len: int, vocab: int, device, seed: int = 0):
    """Rows of exactly seq_len tokens, each split into documents of log-normal lengths."""
    rng = np.random.default_rng(seed)
    lengths = []
    for _ in range(rows):
        left = seq_len
        while left > 0:
            n = int(min(left, max(8, rng.lognormal(np.log(seq_len / 4), 0.8))))
            lengths.append(n)
            left -= n
    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    tokens = rows * seq_len
    input_ids = torch.randint(5, vocab, (tokens,), device=device)
    labels = torch.where(torch.rand(tokens, device=device) < 0.3, input_ids, torch.full_like(input_ids, -100))
    return input_ids, cu_seqlens, max(lengths), labels


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_gpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--preset", default="base")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=32, help="rows per step (the micro-batch)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (the first one compiles)")
    parser.add_argument(
        "--backend", default="auto", help="attention backend: auto, flash, varlen, flex, sdpa"
    )
    parser.add_argument("--compile", action="store_true", help="compile each encoder layer, as in training")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="after timing, profile N more steps: the top operators by their own device time are printed "
        "and kept in the result (where a GPU step's time goes)",
    )  # fmt: skip
    parser.add_argument(
        "--compare-optimizers", type=int, default=0, metavar="R",
        help="after timing, R alternating rounds of each optimizer implementation (optimi, foreach), with "
        "and without a host read before the optimizer step",
    )  # fmt: skip
    parser.add_argument(
        "--with-compiled-optimizer", action="store_true",
        help="the comparison also times foreach compiled (optimizer.compile: true), with the guard's flag",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=Path, help="result file (default on a GPU: results/<device>-<date>.json; CPU: none)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.profile < 0 or args.compare_optimizers < 0:
        parser.error("--steps and --warmup must be at least 1, --profile and --compare-optimizers at least 0")
    return args


def run(args, save=lambda result: None) -> dict:
    """The benchmark's result; `save(result)` is called once the step is timed (and profiled), before the
    optimizer comparison, so that a comparison cut short by its caller's time limit loses only itself."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    backend = resolve_backend(args.backend, device, dropout=False, backward=True)
    config = ModernBertConfig.from_preset(args.preset, attn_backend=backend)
    model = ModernBertForMaskedLM(config).to(device)
    optimizer = build_optimizer(model, lr=8e-4)
    if args.compile:
        model.model.compile_layers()  # what `model.compile: true` does in training
    input_ids, cu_seqlens, max_seqlen, labels = packed_batch(
        args.rows, args.seq_len, config.vocab_size, device
    )
    tokens = input_ids.numel()
    # The call training makes (train.composer_model): the labelled positions known up front, no logits.
    labelled_index = (labels != -100).nonzero().squeeze(1)
    inputs = dict(input_ids=input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, labels=labels)
    labelled = labelled_index.numel()

    def step(optimizer=optimizer, read_loss: bool = False, flag: bool = False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**inputs, labelled_index=labelled_index, return_logits=False).loss
        loss.backward()
        if read_loss:
            loss.item()  # as the non-finite guard does before an optimi step
        if flag:  # as the guard hands its verdict to a foreach step: on the device, a masked step
            optimizer.skip_next_step_if(~torch.isfinite(loss.detach()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if flag:
            optimizer.settle_skip()

    def timed_step(**kwargs) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step(**kwargs)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    first_step = timed_step()
    # Every step sees the same batch, so a compiled step that compiles again would do so on every batch
    # of a training run: fail at once with dynamo's reason instead of timing recompilations.
    torch._dynamo.config.error_on_recompile = True
    for _ in range(args.warmup - 1):
        timed_step()
    times = [timed_step() for _ in range(args.steps)]

    step_time = statistics.median(times)
    profile = profile_steps(step, args.profile, cuda) if args.profile else None
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None  # before more optimizers
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_flops(name) if cuda else None
    flops = training_flops(config, args.seq_len, tokens, labelled)
    result = {
        "device": name,
        "model": args.preset,
        "seq_len": args.seq_len,
        "rows_per_step": args.rows,
        "attention_backend": backend,
        "compile": args.compile,
        "precision": "amp_bf16" if cuda else "fp32",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "date": datetime.date.today().isoformat(),
        "tokens_per_step": tokens,
        "labelled_tokens_per_step": labelled,
        "gflop_per_token": flops / tokens / 1e9,
        "median_step_s": step_time,
        "first_step_s": first_step,
        # The first step's extra time is mostly compilation (the rest: kernel selection, allocator warmup).
        "compile_s": first_step - step_time if args.compile else None,
        "step_times_s": [round(t, 5) for t in times],
        "tokens_per_second_per_gpu": tokens / step_time,
        "model_tflops": flops / step_time / 1e12,
        "peak_flops": peak,
        "mfu": flops / step_time / peak if peak else None,
        "peak_memory_gib": peak_memory,
        "profile": profile,
        "optimizers": None,
    }
    if args.compare_optimizers:
        save(result)
        torch._dynamo.config.error_on_recompile = False  # the compiled optimizer makes a graph per group
        result["optimizers"] = compare_optimizers(
            model, timed_step, args.compare_optimizers, max(3, args.steps // 4), args.with_compiled_optimizer
        )
    return result


def compare_optimizers(model, timed_step, rounds: int, steps: int, with_compiled: bool = False) -> dict:
    """Median step time per optimizer implementation, with and without the host read before the optimizer
    step, and foreach with the non-finite verdict handed over on the device (`foreach_flag_s`), from
    `rounds` alternating rounds of `steps` steps (each optimizer warmed up first: its state made, its
    kernels compiled). Times in seconds; `ratio_*` is foreach's time over optimi's. `ratio_composer` is the
    choice a Composer batch makes: optimi with the guard's read before its step, or foreach with the flag
    and no read (train.nonfinite_guard); below 1, `optimizer.impl: foreach` is the faster on this device.
    `with_compiled`: foreach compiled too (`foreach_compiled_flag_s`; `ratio_compiled` is its time over
    eager foreach's, both with the flag: below 1, `optimizer.compile: true` pays on this device)."""
    impls = ("optimi", "foreach")
    optimizers = {impl: build_optimizer(model, lr=8e-4, impl=impl) for impl in impls}
    variants = [(impl, read, False) for impl in impls for read in (False, True)] + [("foreach", False, True)]
    if with_compiled:
        optimizers["foreach_compiled"] = build_optimizer(model, lr=8e-4, impl="foreach", compile=True)
        variants.append(("foreach_compiled", False, True))

    def timed(variant):
        return timed_step(optimizer=optimizers[variant[0]], read_loss=variant[1], flag=variant[2])

    for variant in variants:
        for _ in range(2):
            timed(variant)
    times = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant in variants:
            times[variant] += [timed(variant) for _ in range(steps)]
    medians = {variant: statistics.median(values) for variant, values in times.items()}
    result = {"rounds": rounds, "steps_per_round": steps}
    for impl, read, flag in variants:
        result[f"{impl}{'_read_loss' if read else ''}{'_flag' if flag else ''}_s"] = medians[impl, read, flag]
    result["ratio"] = medians["foreach", False, False] / medians["optimi", False, False]
    result["ratio_read_loss"] = medians["foreach", True, False] / medians["optimi", True, False]
    result["ratio_composer"] = medians["foreach", False, True] / medians["optimi", True, False]
    if with_compiled:
        result["ratio_compiled"] = medians["foreach_compiled", False, True] / medians["foreach", False, True]
    return result


def profile_steps(step, steps: int, cuda: bool, top: int = 25) -> dict:
    """Run `steps` steps under torch.profiler; their summary (`modernbert_train.profiling.summarize`): the
    device kernels (CPU operators on a CPU) that take the most time of their own, by kernel family, the
    device's idle share and the host reads per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - began) * 1e6
    averages = prof.key_averages()
    summary = summarize(averages, steps, wall_us, cuda, top)
    ranked = summary["sorted_by"].replace("_", " ")
    print(f"== profile: {steps} steps, top {top} {summary['counted']} by {ranked}")
    print(table(averages, cuda, top))
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench_gpu: error: no CUDA device here (use --device cpu --preset tiny to check)", file=sys.stderr
        )
        return 2

    # A CPU run is a check, not a GPU result: it is only written where --output says.
    def save(result: dict) -> None:
        output = args.output
        if output is None and args.device != "cpu":
            output = RESULTS / f"{device_slug(result['device'])}-{result['date']}.json"
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=2) + "\n")

    try:
        result = run(args, save)
    except ModelConfigError as e:
        print(f"bench_gpu: error: {e}", file=sys.stderr)
        return 2
    except torch._dynamo.exc.RecompileError as e:
        reason = " ".join(str(e).split())
        print(
            f"bench_gpu: error: the compiled step compiled again for the same batch: {reason}",
            file=sys.stderr,
        )
        return 3
    print(json.dumps(result, indent=2))
    save(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
