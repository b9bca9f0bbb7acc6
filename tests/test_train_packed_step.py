"""The Composer step on packed batches: a fixed token count, padding as documents of their own, the same
loss and gradients as the real tokens alone, and no op that would make a GPU wait for the host."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from modernbert_train.data.packing import Chunk, rows_to_batch
from modernbert_train.model import ModernBertConfig
from modernbert_train.train.composer_model import ModernBertMLM, packed_inputs, split_batch

VOCAB, SEQ_LEN, PAD = 90, 24, 0

# Ops that need a value from the device on the host (a sync on a GPU): .item()/int(), nonzero and the
# boolean-mask indexing built on it, masked_select.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncing = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        )
        if name in SYNCING_OPS or boolean_index:
            self.syncing.append(name)
        return func(*args, **(kwargs or {}))


def packed_batch(row_lengths: list[list[int]], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows, labels = [], {}
    for r, lengths in enumerate(row_lengths):
        row = []
        for d, n in enumerate(lengths):
            ids = rng.integers(4, VOCAB, n)
            labels[(r, d)] = np.where(rng.random(n) < 0.4, ids, -100)
            row.append(Chunk((r, d), ids))
        rows.append(row)
    return rows_to_batch(rows, SEQ_LEN, PAD, mask=lambda chunk: (chunk.input_ids, labels[chunk.key]))


def composer_model() -> ModernBertMLM:
    torch.manual_seed(0)
    values = dict(vocab_size=VOCAB, pad_token_id=PAD, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    return ModernBertMLM(ModernBertConfig.from_preset("tiny", local_attention=8, **values)).train()


def real_tokens_only(batch: dict) -> dict:
    """The plain layout: padding dropped, documents from seq_lens (what the step did before)."""
    real = batch["attention_mask"].bool()
    seq_lens = batch["seq_lens"]
    lengths = seq_lens[seq_lens > 0]
    return {
        "input_ids": batch["input_ids"][real],
        "labels": batch["labels"][real],
        "cu_seqlens": F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)),
        "max_seqlen": int(lengths.max()),
    }


# Rows with one, several and no padding at all, and a long padding tail.
ROWS = [[10, 7, 5], [24], [3, 3, 3, 3, 3], [9]]


def test_padding_documents_keep_the_token_count_fixed():
    for rows in (ROWS, [[24], [24], [24], [24]], [[1], [2], [3], [4]]):
        batch = packed_batch(rows)
        inputs = packed_inputs(batch)
        assert inputs["input_ids"].shape == inputs["labels"].shape == (len(rows) * SEQ_LEN,)
        lengths = inputs["cu_seqlens"].diff().tolist()
        expected = [n for row in rows for n in row + [SEQ_LEN - sum(row)] if n]
        assert lengths == expected and inputs["max_seqlen"] == max(expected)
        flat_labels = batch["labels"].reshape(-1)
        assert torch.equal(flat_labels[inputs["labelled_index"]], flat_labels[flat_labels != -100])
        assert torch.all(inputs["labelled_index"].diff() > 0)


def test_fixed_token_count_gives_the_loss_and_gradients_of_the_real_tokens():
    model = composer_model()
    batch = packed_batch(ROWS)
    results = []
    for inputs in (real_tokens_only(batch), packed_inputs(batch)):
        loss = model.model(**inputs).loss
        results.append((loss, *torch.autograd.grad(loss, list(model.parameters()))))
    # Through Composer's entry point: split on the host, then the training call (no logits).
    (micro,) = split_batch(batch, microbatch_size=len(ROWS))
    out = model(micro)
    assert out.logits is None
    results.append((out.loss, *torch.autograd.grad(model.loss(out, micro), list(model.parameters()))))
    names = ["loss"] + [name for name, _ in model.named_parameters()]
    for expected, packed, trained in zip(*results):
        torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-6)
    assert len(names) == len(results[0])


def test_split_micro_batches_carry_their_own_packed_inputs():
    batch = packed_batch(ROWS)
    micro_batches = split_batch(batch, microbatch_size=3)
    assert [m["input_ids"].shape[0] for m in micro_batches] == [3, 1]
    for start, micro in zip((0, 3), micro_batches):
        rows = {key: value[start : start + 3] for key, value in batch.items()}
        expected = packed_inputs(rows)
        assert micro["packed"].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(torch.as_tensor(micro["packed"][key]), torch.as_tensor(value)), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_every_tensor_copied_for_a_micro_batch_is_pinned(write_recipe):
    """The loaders pin on CUDA, and split_batch pins the tensors it adds: Composer's non_blocking copy of each
    micro-batch then waits for nothing queued on the stream (from pageable memory it would wait for the
    previous micro-batch's backward)."""
    from modernbert_train.train.config import load_config
    from modernbert_train.train.data import build_data

    data = build_data(load_config(write_recipe()))
    assert data.train_loader.pin_memory and data.eval_loader.pin_memory
    batch = next(iter(data.train_loader))
    data.train_loader.dataset.observe(batch)  # takes its pack_state out, as before Composer splits it
    micro_batches = split_batch(batch, microbatch_size=batch["input_ids"].shape[0] // 2)
    assert len(micro_batches) == 2
    for micro in micro_batches:
        parts = (micro, micro["packed"])
        tensors = [v for part in parts for v in part.values() if isinstance(v, torch.Tensor)]
        assert len(tensors) > 5 and all(t.is_pinned() for t in tensors)


def test_the_step_asks_the_device_for_nothing():
    """Forward and backward of a split micro-batch run no op that syncs a GPU with the host."""
    model = composer_model()
    (micro,) = split_batch(packed_batch(ROWS), microbatch_size=len(ROWS))
    model(micro).loss.backward()  # first call: one-off probes and caches
    with RecordOps() as ops:
        model(micro).loss.backward()
    assert ops.syncing == []
    # The check sees what the former step did: boolean indexing, int(max), the labelled tokens' search.
    with RecordOps() as ops:
        model.model(**real_tokens_only(micro)).loss.backward()
    assert set(ops.syncing) == {"index", "_local_scalar_dense", "nonzero"}


def test_eval_keeps_logits_for_accuracy():
    model = composer_model().eval()
    (micro,) = split_batch(packed_batch(ROWS), microbatch_size=len(ROWS))
    with torch.no_grad():
        out = model.eval_forward(micro)
    labelled = int((micro["labels"] != -100).sum())
    assert out.logits.shape == (labelled, VOCAB)
    for metric in model.get_metrics().values():
        model.update_metric(micro, out, metric)
        assert torch.isfinite(metric.compute())
