"""GPU training step of our ModernBERT against transformers' at its best, in one run.

Like for like: the same weights (ours copied into transformers' ModernBertForMaskedLM), the same padded
batches called HF-style (input_ids, attention_mask, labels), bf16 autocast, train mode, forward + backward
(no optimizer: it is the same work on both sides). transformers runs with `sparse_prediction=True` (its head
and decoder see only the labelled tokens, as ours) and each attention implementation it has here (sdpa, flex,
flash_attention_2 when the flash_attn package is present), eager and under `torch.compile`; ours runs the
training configuration (auto backend, every layer compiled) and eager. The ratio is against transformers'
fastest configuration.

Shapes: `rows` x `seq_len`; every row full (fixed) or row lengths ~ N(seq_len/2, seq_len/8) (variable: we
unpad, transformers' SDPA path computes the padding). 30% of real tokens labelled.

Rounds alternate the order of the configurations; medians of per-step wall times (synchronised) are reported.
Each configuration's warmup (compilation included) is timed on its own. A configuration that fails is recorded
with its error and the rest still run; `--budget-s` stops starting new configurations when time runs out.

    python -m benchmarks.bench_hf_gpu [--preset base] [--seq-len 1024] [--rows 16] [--output FILE]
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import ModernBertConfig as HFConfig
from transformers import ModernBertForMaskedLM as HFModel

from benchmarks.devices import device_slug, package_version, peak_flops
from modernbert_train.hf import config_to_hf
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM, training_flops
from modernbert_train.model.attention import resolve_backend

MASK_RATE = 0.3
COMPILE_RESERVE_S = 100


def make_batch(rows: int, seq_len: int, lengths: torch.Tensor, vocab: int, pad_id: int, device, generator):
    input_ids = torch.randint(5, vocab, (rows, seq_len), generator=generator)
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    input_ids[attention_mask == 0] = pad_id
    masked = (torch.rand(rows, seq_len, generator=generator) < MASK_RATE) & attention_mask.bool()
    labels = torch.where(masked, input_ids, -100)
    return {
        k: v.to(device)
        for k, v in dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels).items()
    }


def hf_attention_choices(requested: str) -> list[str]:
    """transformers' attention implementations to run: sdpa by default; flash_attention_2 put first when
    the flash_attn package is there (its fastest path); flex_attention only when asked (on an H200 its
    eager warmup took 28 s and its compiled one more than the rest of the run, 2026-12-04)."""
    choices = [a for a in requested.split(",") if a]
    if (
        package_version("flash_attn") or package_version("flash-attn")
    ) and "flash_attention_2" not in choices:
        choices.insert(0, "flash_attention_2")
    return choices


def our_model(preset: str, device, layers: int | None) -> ModernBertForMaskedLM:
    overrides = {"num_hidden_layers": layers} if layers else {}
    backend = resolve_backend("auto", device, dropout=False, backward=True)
    config = ModernBertConfig.from_preset(preset, attn_backend=backend, **overrides)
    torch.manual_seed(0)
    return ModernBertForMaskedLM(config).to(device).train()


def their_model(ours: ModernBertForMaskedLM, attn: str, device) -> HFModel:
    values = {k: v for k, v in config_to_hf(ours.config).items() if k != "model_type"}
    theirs = HFModel(HFConfig(**values, sparse_prediction=True, attn_implementation=attn)).to(device).train()
    theirs.load_state_dict(ours.state_dict())  # strict: every weight maps
    return theirs


def autocast(device):
    # bf16 on a GPU, as training runs; fp32 on a CPU (the dry run).
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fn(model, batch, ours: bool, device):
    kwargs = {"return_logits": False} if ours else {}

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        with autocast(device):
            loss = model(**batch, **kwargs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--budget-s", type=float, default=400, help="start no configuration that could end after this"
    )
    parser.add_argument("--shapes", default="fixed,variable")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run (with --preset tiny)")
    parser.add_argument(
        "--eager-only", action="store_true", help="no compiled configurations (a CPU dry run)"
    )
    parser.add_argument(
        "--hf-attn", default="sdpa", help="transformers' attention implementations, comma-separated"
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_hf_gpu: error: no CUDA device here (--device cpu --preset tiny for a dry run)",
            file=sys.stderr,
        )
        return 2
    began = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    attns = hf_attention_choices(args.hf_attn)
    ours = our_model(args.preset, device, args.layers)
    config, backend = ours.config, ours.config.attn_backend
    compiled = our_model(args.preset, device, args.layers)
    compiled.load_state_dict(ours.state_dict())
    for layer in compiled.model.layers:  # what `model.compile: true` does in training
        layer.compile(dynamic=True)
    # Most telling first: a configuration the budget skips is one of the later ones.
    models = {} if args.eager_only else {"ours_compiled": compiled}
    for i, attn in enumerate(attns):
        theirs = their_model(ours, attn, device)
        models[f"theirs_{attn}_eager"] = theirs
        if not args.eager_only:
            models[f"theirs_{attn}_compiled"] = torch.compile(their_model(ours, attn, device))
        if i == 0:
            models["ours_eager"] = ours

    generator = torch.Generator().manual_seed(0)
    rows, seq_len = args.rows, args.seq_len
    variable = (
        torch.normal(seq_len / 2, seq_len / 8, (rows,), generator=generator).round().clamp(16, seq_len).long()
    )
    all_shapes = {
        "fixed": torch.full((rows,), seq_len),
        "variable": variable,
    }
    result = {
        "device": name,
        "model": args.preset + (f" ({args.layers} layers)" if args.layers else ""),
        "seq_len": seq_len,
        "rows": rows,
        "ours_attention_backend": backend,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "call": "padded, HF-style (input_ids, attention_mask, labels); bf16 autocast; forward + backward",
        "theirs": "sparse_prediction=True; attn_implementation in " + ", ".join(attns),
        "shapes": {},
    }
    peak = peak_flops(name) if device.type == "cuda" else None
    output = args.output
    if output is None and device.type == "cuda":
        output = Path(__file__).parent / "results" / f"{device_slug(name)}-{result['date']}-vs-hf.json"

    def save() -> None:
        # After every configuration: a run cut short by its caller's time limit keeps what it measured.
        result["elapsed_s"] = round(time.perf_counter() - began, 1)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=2) + "\n")

    for shape in args.shapes.split(","):
        batch = make_batch(
            rows, seq_len, all_shapes[shape], config.vocab_size, config.pad_token_id, device, generator
        )
        tokens = int(batch["attention_mask"].sum())
        labelled = int((batch["labels"] != -100).sum())
        flops = training_flops(config, seq_len, tokens, labelled)
        entry = {"real_tokens": tokens, "labelled_tokens": labelled, "configs": {}}
        result["shapes"][shape] = entry
        live = {}
        with torch.no_grad(), autocast(device):
            reference = ours(**batch, return_logits=False).loss.item()
        for key, model in models.items():
            record = entry["configs"].setdefault(key, {})
            # A compilation takes 45-95 s for base on an H200: none is started that the budget cannot hold.
            need = COMPILE_RESERVE_S if key.endswith("compiled") else 0
            if time.perf_counter() - began + need > args.budget_s:
                record["status"] = "skipped: budget"
                continue
            step = step_fn(model, batch, key.startswith("ours"), device)
            try:
                started = time.perf_counter()
                with torch.no_grad(), autocast(device):
                    kwargs = {"return_logits": False} if key.startswith("ours") else {}
                    loss = model(**batch, **kwargs).loss.item()
                for _ in range(args.warmup):
                    step()
                record["warmup_s"] = round(time.perf_counter() - started, 1)
                # Same weights, same batch: the same loss to bf16 precision, or the timing compares nothing.
                record["loss"] = loss
                record["loss_gap_vs_ours_eager"] = abs(loss - reference)
                if abs(loss - reference) > 2e-2 * abs(reference):
                    raise RuntimeError(f"loss {loss} vs ours {reference}: not the same computation")
                live[key] = (step, [])
                record["status"] = "ok"
            except Exception as e:  # recorded; the others still run
                record["status"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            print(f"{shape} {key}: {record}", flush=True)
            save()
        names = list(live)
        for r in range(args.rounds):
            for key in names if r % 2 == 0 else names[::-1]:
                live[key][1].append(live[key][0]())
        for key, (_, times) in live.items():
            median = statistics.median(times)
            entry["configs"][key].update(
                median_step_s=round(median, 5),
                step_times_s=[round(t, 5) for t in times],
                tokens_per_s=round(tokens / median),
                # Forward + backward of what runs: the honest count (head and decoder on labelled tokens).
                mfu=round(flops / median / peak, 4) if peak else None,
            )
        theirs_times = {
            k: v["median_step_s"]
            for k, v in entry["configs"].items()
            if k.startswith("theirs") and "median_step_s" in v
        }
        if theirs_times:
            best = min(theirs_times, key=theirs_times.get)
            entry["theirs_best"] = best
            for key in ("ours_compiled", "ours_eager"):
                if "median_step_s" in entry["configs"].get(key, {}):
                    ratio = theirs_times[best] / entry["configs"][key]["median_step_s"]
                    entry[f"speedup_{key}_vs_theirs_best"] = round(ratio, 3)
        print(f"{shape}: " + json.dumps({k: v for k, v in entry.items() if k != "configs"}), flush=True)
        save()
    save()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
