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


def packed_inputs(seed: int, min_doc: int = 1, max_doc: int = SEQ_LEN - 1, full: bool = False) -> dict:
    """Four rows of SEQ_LEN slots, packed with documents of random lengths (a different layout per seed);
    full: every slot taken."""
    rng = np.random.default_rng(seed)
    rows, labels = [], {}
    for r in range(4):
        row, left = [], SEQ_LEN if full else int(rng.integers(SEQ_LEN - 6, SEQ_LEN + 1))
        while left > 0:
            n = min(left, int(rng.integers(min_doc, max_doc + 1)))
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
    model.model.compile_layers(backend=counter)
    for seed in range(4):
        model(**packed_inputs(seed), return_logits=False).loss.backward()
    assert counter.frame_count == 3


def test_every_variant_of_the_compiled_layers_stays_compiled():
    """All layers share one code object, so one compile cache: training and evaluation, batches whose rows
    are each one whole document (no scatter index) and batches of documents shorter than the window (the
    local mask is the global one) each need graphs of their own. torch's default limit of 8 per code object
    was met by a long-document corpus with evaluation, and past it layers ran eager with one warning line."""
    model = tiny_model()
    counter = CompileCounterWithBackend("eager")
    model.model.compile_layers(backend=counter)
    kinds = [packed_inputs(0), packed_inputs(1, SEQ_LEN, SEQ_LEN, full=True), packed_inputs(2, max_doc=4)]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # past the limit: raise, not eager
        for _ in range(2):
            for inputs in kinds:
                model.train()(**inputs, return_logits=False).loss.backward()
                with torch.no_grad():
                    model.eval()(**inputs, return_logits=False)
            compiled = counter.frame_count
    assert compiled > 8  # more than torch's default limit, all compiled once, none again
    assert counter.frame_count == compiled
