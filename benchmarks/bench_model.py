"""CPU training step of our ModernBERT against transformers' (attn_implementation="sdpa").

Same weights and batch for both: the mini preset, batch 8, rows padded to 512, 30% of real tokens
labelled; forward + backward. Two batches: every row 512 tokens (fixed) and row lengths ~ N(256, 64)
(variable). After warmup the two models alternate, so drifting machine load hits both alike; we report
median seconds per step and ours/theirs.

    python -m benchmarks.bench_model [--repeats N]
"""

import argparse
import json
import statistics
import time

import torch
from transformers import ModernBertConfig as HFConfig
from transformers import ModernBertForMaskedLM as HFModel

from modernbert_train.hf import config_to_hf
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

BATCH, SEQ_LEN, MASK_RATE = 8, 512, 0.3


def make_batch(lengths: torch.Tensor, vocab_size: int, pad_token_id: int, generator: torch.Generator) -> dict:
    input_ids = torch.randint(5, vocab_size, (BATCH, SEQ_LEN), generator=generator)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    input_ids[attention_mask == 0] = pad_token_id
    masked = (torch.rand(BATCH, SEQ_LEN, generator=generator) < MASK_RATE) & attention_mask.bool()
    labels = torch.where(masked, input_ids, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def train_step(model: torch.nn.Module, batch: dict) -> float:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def compare(ours, theirs, batch: dict, repeats: int) -> dict:
    for model in (ours, theirs):  # warmup: allocator, thread pools
        train_step(model, batch)
    times = {"ours": [], "theirs": []}
    for _ in range(repeats):
        times["ours"].append(train_step(ours, batch))
        times["theirs"].append(train_step(theirs, batch))
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["theirs"])
    tokens = int(batch["attention_mask"].sum())
    return {
        "ours_s": round(ours_s, 4),
        "theirs_s": round(theirs_s, 4),
        "ratio": round(ours_s / theirs_s, 3),
        "real_tokens": tokens,
        "ours_tokens_per_s": round(tokens / ours_s),
    }


def main(repeats: int = 3) -> dict:
    torch.manual_seed(0)
    config = ModernBertConfig.from_preset("mini", attn_backend="sdpa")
    ours = ModernBertForMaskedLM(config).train()
    hf_values = {k: v for k, v in config_to_hf(config).items() if k != "model_type"}
    theirs = HFModel(HFConfig(**hf_values, attn_implementation="sdpa")).train()
    theirs.load_state_dict(ours.state_dict())

    generator = torch.Generator().manual_seed(0)
    variable = torch.normal(256.0, 64.0, (BATCH,), generator=generator).round().clamp(16, SEQ_LEN).long()
    batches = {
        "fixed": make_batch(torch.full((BATCH,), SEQ_LEN), config.vocab_size, config.pad_token_id, generator),
        "variable": make_batch(variable, config.vocab_size, config.pad_token_id, generator),
    }
    results = {"model": "mini", "batch": BATCH, "seq_len": SEQ_LEN, "threads": torch.get_num_threads()}
    for name, batch in batches.items():
        results[name] = compare(ours, theirs, batch, repeats)
        print(f"{name:>8}: {json.dumps(results[name])}", flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    main(parser.parse_args().repeats)
