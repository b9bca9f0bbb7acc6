"""The encoder as one compiled region: no graph breaks, no recompiles once packings vary at a fixed token
count, and the same loss and gradients as eager."""

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from modernbert_train.data.packing import Chunk, rows_to_batch
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.model.attention import _flex_backward_runs_on_cpu
from modernbert_train.train.composer_model import split_batch

VOCAB, SEQ_LEN = 90, 32


def packed_inputs(seed: int) -> dict:
    """Four rows of SEQ_LEN slots, packed with documents of random lengths (a different layout per seed)."""
    rng = np.random.default_rng(seed)
    rows, labels = [], {}
    for r in range(4):
        row, left = [], int(rng.integers(SEQ_LEN - 6, SEQ_LEN + 1))
        while left > 0:
            n = min(left, int(rng.integers(1, SEQ_LEN)))
            ids = rng.integers(4, VOCAB, n)
            row.append(Chunk((r, len(row)), ids))
            labels[row[-1].key] = np.where(rng.random(n) < 0.4, ids, -100)
            left -= n
        rows.append(row)
    batch = rows_to_batch(rows, SEQ_LEN, 0, mask=lambda chunk: (chunk.input_ids, labels[chunk.key]))
    (micro,) = split_batch(batch, microbatch_size=4)
    return micro["packed"]


def tiny_model(**overrides) -> ModernBertForMaskedLM:
    torch.manual_seed(0)
    values = dict(vocab_size=VOCAB, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    config = ModernBertConfig.from_preset("tiny", local_attention=8, **values, **overrides)
    return ModernBertForMaskedLM(config).train()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_encoder_compiles_whole_without_breaks_or_recompiles(backend):
    compiled, eager = tiny_model(attn_backend=backend), tiny_model(attn_backend=backend)
    counter = CompileCounterWithBackend("aot_eager")
    # fullgraph: a graph break would raise.
    compiled.model.encode = torch.compile(compiled.model.encode, backend=counter, fullgraph=True)
    # Training where this torch has FlexAttention's CPU backward; the forward alone elsewhere.
    train = backend == "sdpa" or _flex_backward_runs_on_cpu()
    with torch.set_grad_enabled(train):
        for seed in range(4):
            inputs = packed_inputs(seed)
            assert inputs["input_ids"].shape == (4 * SEQ_LEN,)
            results = []
            for model in (compiled, eager):
                loss = model(**inputs, return_logits=False).loss
                grads = torch.autograd.grad(loss, list(model.parameters())) if train else ()
                results.append([loss, *grads])
            for got, expected in zip(*results):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The first packing compiles with static shapes, the second marks the varying ones (documents, longest
    # document) dynamic; the token count never changes, so nothing compiles after that.
    assert counter.frame_count <= 2


def test_compiled_layers_do_not_recompile_per_batch():
    """Each layer compiled in place (the trainer's model.compile): one graph for the global layers, one for
    the local ones and one for the last layer (which goes on with the labelled tokens only), whatever the
    packing. Backends are passed to the layers as objects with an
    `attend` method; calling a new object per batch would recompile every batch (torch.compile guards a
    called object by identity) until its recompile limit, and then run eager."""
    model = tiny_model()
    counter = CompileCounterWithBackend("eager")
    for layer in model.model.layers:
        layer.compile(backend=counter, dynamic=True)
    for seed in range(4):
        model(**packed_inputs(seed), return_logits=False).loss.backward()
    assert counter.frame_count == 3
