"""GPU training throughput and MFU of the model alone (no data loading): `python -m benchmarks.bench_gpu`.

A packed batch (rows of `seq_len` tokens holding documents of mixed lengths, 30% labelled) goes through
forward, backward and a StableAdamW step under bf16 autocast, as in pretraining. Results go to
`benchmarks/results/<device>-<date>.json` with `device`, `mfu`, `tokens_per_second_per_gpu`, `seq_len`,
`model`, `torch`, `attention_backend`. `--device cpu --preset tiny` runs the same code on a CPU as a check.
"""

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM, flops_per_token
from modernbert_train.model.attention import resolve_backend
from modernbert_train.optim import build_optimizer

# Dense bf16 peak FLOP/s by device name; MFU is reported against these.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


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


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=32, help="rows per step (the micro-batch)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (use --device cpu --preset tiny to check)")
        return {"skipped": "no CUDA device"}

    device = torch.device(args.device)
    config = ModernBertConfig.from_preset(args.preset, attn_backend=args.backend)
    model = ModernBertForMaskedLM(config).to(device)
    optimizer = build_optimizer(model, lr=8e-4)
    step_model = torch.compile(model, dynamic=True) if args.compile else model
    input_ids, cu_seqlens, max_seqlen, labels = packed_batch(
        args.rows, args.seq_len, config.vocab_size, device
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = step_model(
                input_ids=input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, labels=labels
            ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)

    step_time = statistics.median(times)
    tokens_per_second = args.rows * args.seq_len / step_time
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name)
    achieved = flops_per_token(config, args.seq_len) * tokens_per_second
    result = {
        "device": name,
        "model": args.preset,
        "seq_len": args.seq_len,
        "rows_per_step": args.rows,
        "attention_backend": resolve_backend(args.backend, device, False),
        "compile": args.compile,
        "torch": torch.__version__,
        "median_step_s": step_time,
        "tokens_per_second_per_gpu": tokens_per_second,
        "model_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    (out_dir / f"{slug}-{datetime.date.today().isoformat()}.json").write_text(
        json.dumps(result, indent=2) + "\n"
    )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
