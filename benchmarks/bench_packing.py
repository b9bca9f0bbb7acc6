"""Packed-batch production rate on one core: read local MDS shards, chunk, mask, pack, build tensors.

Target: 2x what one H100 consumes training ModernBERT-base (~500k tokens/s), i.e. >= 1M tokens/s
with num_workers=0, so a few DataLoader workers keep any GPU fed.
`python -m benchmarks.bench_packing`
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch

from modernbert_train.data import TokenizerInfo, build_dataloader, build_train_dataset
from modernbert_train.data.synthetic import write_synthetic_mds

H100_TOKENS_PER_SECOND = 500_000
MAX_SEQ_LEN = 1024
NUM_DOCS = 8000
EPOCHS = 3


def main() -> dict:
    torch.set_num_threads(1)
    tokenizer = TokenizerInfo(pad_id=50283, cls_id=50281, sep_id=50282, mask_id=50284, vocab_size=50368)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mds"
        documents = write_synthetic_mds(folder, NUM_DOCS, seed=0, token_range=(0, 50280), size_limit=1 << 24)
        dataset = build_train_dataset(
            [{"local": str(folder)}],
            tokenizer=tokenizer,
            max_seq_len=MAX_SEQ_LEN,
            global_batch_size=32,
            lookahead=1000,
        )
        loader = build_dataloader(dataset, num_workers=0)
        rates, efficiencies = [], []
        for _ in range(EPOCHS):
            slots = real = 0
            start = time.perf_counter()
            for batch in loader:
                dataset.observe(batch)
                slots += batch["input_ids"].numel()
                real += int(batch["attention_mask"].sum())
            rates.append(slots / (time.perf_counter() - start))
            efficiencies.append(real / slots)
    rate = statistics.median(rates)
    result = {
        "max_seq_len": MAX_SEQ_LEN,
        "documents": NUM_DOCS,
        "corpus_tokens": int(sum(len(d) for d in documents)),
        "tokens_per_second": round(rate),
        "tokens_per_second_runs": [round(r) for r in rates],
        "vs_h100_base_consumption": round(rate / H100_TOKENS_PER_SECOND, 2),
        "packing_efficiency": round(statistics.median(efficiencies), 4),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
