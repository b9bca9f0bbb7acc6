"""CPU training step (forward + backward) of our ModernBERT against transformers' at its best.

Like for like: the same weights and batches, fp32, train mode, no dropout; each side runs its fastest
training configuration available on a CPU. transformers: `sparse_prediction=True` (its head and decoder see
only the labelled tokens, as ours) and `attn_implementation="sdpa"` (4.57's ModernBERT offers eager, sdpa
and flash_attention_2, the last CUDA-only; its torch.compile option is off on CPUs). Ours: the training call,
`return_logits=False` (the chunked cross-entropy); ours with logits is timed too, for the record.

Model: two layers of ModernBERT-base width (hidden 768, intermediate 1152, 12 heads; one global layer and
one local), vocabulary 50368, as issue 8 measured. Batches of 4 x 512 with 30% of the real tokens
labelled, called HF-style (padded, attention_mask): every row 512 tokens (fixed) or row lengths
~ N(256, 64) (variable; we unpad, transformers' SDPA path computes the padding).

Rounds alternate the models, the first of each round taking turns, so drifting load on a shared machine hits
all alike; we report medians of per-step wall times, ours/theirs per round, the machine and its load.

    python -m benchmarks.bench_model [--rounds N] [--threads N] [--layers N]
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import ModernBertConfig as HFConfig
from transformers import ModernBertForMaskedLM as HFModel

from modernbert_train.hf import config_to_hf
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

BATCH, SEQ_LEN, MASK_RATE = 4, 512, 0.3


def make_batch(lengths: torch.Tensor, vocab_size: int, pad_token_id: int, generator: torch.Generator) -> dict:
    input_ids = torch.randint(5, vocab_size, (BATCH, SEQ_LEN), generator=generator)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    input_ids[attention_mask == 0] = pad_token_id
    masked = (torch.rand(BATCH, SEQ_LEN, generator=generator) < MASK_RATE) & attention_mask.bool()
    labels = torch.where(masked, input_ids, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def train_step(model: torch.nn.Module, batch: dict, **kwargs) -> float:
    start = time.perf_counter()
    loss = model(**batch, **kwargs).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def compare(steps: dict, batch: dict, rounds: int) -> dict:
    names = list(steps)
    for name in names:  # warmup: allocator, thread pools
        steps[name](batch)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(steps[name](batch))
    median = {name: statistics.median(t) for name, t in times.items()}
    tokens = int(batch["attention_mask"].sum())
    return {
        "ours_s": round(median["ours"], 4),
        "ours_with_logits_s": round(median["ours_with_logits"], 4),
        "theirs_s": round(median["theirs"], 4),
        "ratio": round(median["ours"] / median["theirs"], 3),
        "ratio_with_logits": round(median["ours_with_logits"] / median["theirs"], 3),
        "ratio_each_round": [round(o / t, 3) for o, t in zip(times["ours"], times["theirs"])],
        "real_tokens": tokens,
        "labelled_tokens": int((batch["labels"] != -100).sum()),
        "ours_tokens_per_s": round(tokens / median["ours"]),
    }


def machine(threads: int) -> dict:
    with open("/proc/cpuinfo") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {
        "cpu": names[0] if names else platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }


def main(rounds: int = 7, threads: int | None = None, layers: int = 2) -> dict:
    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = ModernBertConfig.from_preset("base", num_hidden_layers=layers, attn_backend="sdpa")
    ours = ModernBertForMaskedLM(config).train()
    hf_values = {k: v for k, v in config_to_hf(config).items() if k != "model_type"}
    theirs = HFModel(
        HFConfig(**hf_values, sparse_prediction=True, reference_compile=False, attn_implementation="sdpa")
    ).train()
    theirs.load_state_dict(ours.state_dict())

    generator = torch.Generator().manual_seed(0)
    variable = torch.normal(256.0, 64.0, (BATCH,), generator=generator).round().clamp(16, SEQ_LEN).long()
    batches = {
        "fixed": make_batch(torch.full((BATCH,), SEQ_LEN), config.vocab_size, config.pad_token_id, generator),
        "variable": make_batch(variable, config.vocab_size, config.pad_token_id, generator),
    }
    steps = {
        "ours": lambda batch: train_step(ours, batch, return_logits=False),
        "ours_with_logits": lambda batch: train_step(ours, batch),
        "theirs": lambda batch: train_step(theirs, batch),
    }
    results = {
        "model": f"base width, {layers} layers, vocab {config.vocab_size}",
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "rounds": rounds,
        "machine": machine(threads),
    }
    for name, batch in batches.items():
        # Like for like: both compute the same loss from the same weights.
        with torch.no_grad():
            gap = abs(ours(**batch, return_logits=False).loss.item() - theirs(**batch).loss.item())
        if gap > 1e-4:
            raise RuntimeError(f"{name}: the two models' losses differ by {gap}; not comparable")
        results[name] = compare(steps, batch, rounds)
        print(f"{name:>8}: {json.dumps(results[name])}", flush=True)
    results["machine"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(main(args.rounds, args.threads, args.layers)["machine"]))
