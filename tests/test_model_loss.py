"""The chunked linear cross-entropy: the plain loss and gradients, without a [tokens x vocab] tensor."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.model import loss as loss_module
from modernbert_train.model.loss import linear_cross_entropy

ROWS, HIDDEN, VOCAB = 30, 16, 101


class CreatedTensors(TorchDispatchMode):
    """Weak references to every tensor an op creates (views aside), to ask what was made and what lives."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and not func.is_view:
                self.created.append((tuple(tensor.shape), weakref.ref(tensor)))
        return out

    def most_rows(self, vocab: int) -> int:
        """The most rows of any [rows, vocab] tensor made."""
        rows = [shape[0] for shape, _ in self.created if len(shape) == 2 and shape[1] == vocab]
        return max(rows, default=0)

    def alive(self) -> list[tuple[int, ...]]:
        return [shape for shape, ref in self.created if ref() is not None]


def inputs(dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    hidden = torch.randn(ROWS, HIDDEN, dtype=dtype, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN, dtype=dtype) * 0.5).requires_grad_()
    bias = (torch.randn(VOCAB, dtype=dtype) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, VOCAB, (ROWS,))
    return hidden, weight, bias, targets


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 7, 30, 4096])
def test_loss_and_gradients_equal_the_plain_cross_entropy(chunk_rows, bias):
    hidden, weight, bias, targets = inputs(torch.float64, bias)
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    chunked = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows)
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=0)
    # A scaled loss (a mean, a gradient-accumulation factor) scales every gradient.
    scaled = grads_of(plain * 0.37, hidden, weight, bias), grads_of(chunked * 0.37, hidden, weight, bias)
    for expected, got in zip(*scaled):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def test_fp32_matches_to_1e5_and_no_gradient_for_frozen_inputs():
    hidden, weight, bias, targets = inputs()
    weight.requires_grad_(False)
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum") / ROWS
    chunked = linear_cross_entropy(hidden, weight, bias, targets, 8) / ROWS
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for expected, got in zip(grads_of(plain, hidden, bias), grads_of(chunked, hidden, bias)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_no_tokens_by_vocab_tensor_is_made_or_kept():
    hidden, weight, bias, targets = inputs()
    with CreatedTensors() as seen:
        loss = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=8)
        kept = seen.alive()
        loss.backward()
    assert seen.most_rows(VOCAB) == 8  # one chunk's logits at a time
    # Between forward and backward only the gradients stay: nothing tokens x vocab.
    assert {shape for shape in kept if shape} == {(ROWS, HIDDEN), (VOCAB, HIDDEN), (VOCAB,)}
    with CreatedTensors() as seen:
        F.cross_entropy(F.linear(hidden, weight, bias), targets).backward()
    assert seen.most_rows(VOCAB) == ROWS  # the check sees the plain path's logits


def test_without_grad_mode_only_the_loss_is_computed():
    hidden, weight, bias, targets = inputs()
    with torch.no_grad(), CreatedTensors() as seen:
        loss = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=8)
    assert (VOCAB, HIDDEN) not in [shape for shape, _ in seen.created]  # no weight gradient summed
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    torch.testing.assert_close(loss, plain)


def test_backward_twice_fails_clearly():
    hidden, weight, bias, targets = inputs()
    loss = linear_cross_entropy(hidden, weight, bias, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_autocast_runs_the_matmuls_in_bf16_and_the_softmax_in_fp32():
    hidden, weight, bias, targets = inputs()
    results = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=8)
            else:
                loss = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")
        results.append((loss, *grads_of(loss, hidden, weight, bias)))
    for expected, got in zip(*results):
        assert got.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_model_trains_the_same_without_logits():
    """The training call (return_logits=False) gives the loss and every gradient, tied decoder included,
    of the call that returns logits; eval keeps its logits."""
    values = dict(vocab_size=VOCAB, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(ModernBertConfig.from_preset("tiny", **values))
    ids = torch.randint(4, VOCAB, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    labels = torch.where((torch.rand(ids.shape) < 0.4) & mask.bool(), ids, -100)
    runs = []
    for return_logits in (True, False):
        out = model(ids, attention_mask=mask, labels=labels, return_logits=return_logits)
        assert (out.logits is None) != return_logits
        runs.append((out.loss, *grads_of(out.loss, *model.parameters())))
    for expected, got in zip(*runs):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Packed, with the labelled positions known on the host.
    flat_ids, flat_labels = ids[:2].reshape(-1), labels[:2].reshape(-1)
    cu_seqlens = torch.tensor([0, 7, 20, 40], dtype=torch.int32)
    labelled_index = (flat_labels != -100).nonzero().squeeze(1)
    packed = [
        model(input_ids=flat_ids, cu_seqlens=cu_seqlens, max_seqlen=20, labels=flat_labels, **extra).loss
        for extra in ({}, {"labelled_index": labelled_index, "return_logits": False})
    ]
    torch.testing.assert_close(packed[1], packed[0], rtol=1e-6, atol=1e-6)


def test_compiled_chunks_match_the_plain_cross_entropy():
    """The compiled softmax terms (the default on CUDA), here through inductor's CPU backend, with chunks
    of varying rows and under autocast too."""
    hidden, weight, bias, targets = inputs()
    for autocast in (False, True):
        results = []
        for compiled in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=8, compiled=compiled)
            results.append((loss, *grads_of(loss, hidden, weight, bias)))
        for expected, got in zip(*results):
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cpu_logits_buffer_is_reused_across_calls():
    """The eager CPU path writes each chunk's logits into one kept buffer (no fresh pages each step)."""
    hidden, weight, bias, targets = inputs()
    linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=8).backward()
    buffer = loss_module._cpu_logits[torch.float32]
    assert buffer.shape == (256, VOCAB)
    fewer = linear_cross_entropy(hidden[:5], weight, bias, targets[:5])
    assert loss_module._cpu_logits[torch.float32] is buffer
    plain = F.cross_entropy(F.linear(hidden[:5], weight, bias), targets[:5], reduction="sum")
    torch.testing.assert_close(fewer, plain)
