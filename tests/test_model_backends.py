"""Attention backends: each computes windowed attention within documents, like a plain reference."""

import pytest
import torch
import torch.nn.functional as F

from modernbert_train.model import ModelConfigError, ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.model.attention import (
    DocumentLayout,
    _flex_backward_runs_on_cpu,
    available_backends,
    build_attention,
    resolve_backend,
)

LENGTHS = [7, 40, 1, 19, 33]
HALF_WINDOW = 5
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference_attention(qkv: torch.Tensor, lengths: list[int], half_window: int | None) -> torch.Tensor:
    """Softmax attention one document at a time, with an explicit window mask."""
    outputs = []
    for doc in qkv.split(lengths):
        query, key, value = doc.float().permute(1, 2, 0, 3)  # [H, L, D]
        scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
        if half_window is not None:
            positions = torch.arange(len(doc), device=qkv.device)
            far = (positions[:, None] - positions[None, :]).abs() > half_window
            scores = scores.masked_fill(far, float("-inf"))
        outputs.append((scores.softmax(-1) @ value).transpose(0, 1))
    return torch.cat(outputs)


def layout_and_qkv(device: str, dtype=torch.float32):
    torch.manual_seed(0)
    cu_seqlens = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).int().to(device)
    layout = DocumentLayout.from_cu_seqlens(cu_seqlens, max(LENGTHS), sum(LENGTHS))
    qkv = torch.randn(sum(LENGTHS), 3, 2, 16, device=device, dtype=dtype)
    return layout, qkv


def check_backend(name: str, device: str, tolerance: float):
    layout, qkv = layout_and_qkv(device, torch.float32 if device == "cpu" else torch.bfloat16)
    attention = build_attention(name, layout, HALF_WINDOW)
    for local in (False, True):
        got = attention.attend(qkv, local, 0.0)
        expected = reference_attention(qkv, LENGTHS, HALF_WINDOW if local else None)
        assert got.shape == expected.shape
        assert (got.float() - expected).abs().max().item() < tolerance, (name, local)


def test_document_layout():
    layout, _ = layout_and_qkv("cpu")
    assert layout.doc_ids.tolist() == sum(([i] * n for i, n in enumerate(LENGTHS)), [])
    assert layout.positions.tolist() == sum((list(range(n)) for n in LENGTHS), [])


@pytest.mark.parametrize("name", ["sdpa", "flex"])
def test_cpu_backends_match_the_reference(name):
    check_backend(name, "cpu", 1e-5)


def test_sdpa_without_padding_matches_the_reference():
    """Equal-length documents take the no-index, no-padding-mask path."""
    cu_seqlens = torch.tensor([0, 24, 48, 72], dtype=torch.int32)
    layout = DocumentLayout.from_cu_seqlens(cu_seqlens, 24, 72)
    qkv = torch.randn(72, 3, 2, 8)
    attention = build_attention("sdpa", layout, HALF_WINDOW)
    assert attention.index is None and attention.global_mask is None
    for local in (False, True):
        expected = reference_attention(qkv, [24, 24, 24], HALF_WINDOW if local else None)
        assert torch.allclose(attention.attend(qkv, local, 0.0), expected, atol=1e-5)


@pytest.mark.skipif(
    not _flex_backward_runs_on_cpu(), reason=f"FlexAttention has no CPU backward in torch {torch.__version__}"
)
def test_flex_model_trains_like_sdpa_on_cpu():
    """FlexAttention runs eagerly on CPU in this torch: forward and backward agree with SDPA."""
    values = dict(vocab_size=64, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    torch.manual_seed(0)
    sdpa = ModernBertForMaskedLM(ModernBertConfig.from_preset("tiny", attn_backend="sdpa", **values))
    flex = ModernBertForMaskedLM(ModernBertConfig.from_preset("tiny", attn_backend="flex", **values))
    flex.load_state_dict(sdpa.state_dict())
    ids = torch.randint(4, 64, (60,))
    labels = torch.where(torch.rand(60) < 0.5, ids, -100)
    cu_seqlens = torch.tensor([0, 12, 50, 60], dtype=torch.int32)
    losses = [model(input_ids=ids, cu_seqlens=cu_seqlens, labels=labels).loss for model in (sdpa, flex)]
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(sdpa.named_parameters(), flex.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_auto_picks_sdpa_on_cpu_and_forcing_an_unusable_backend_fails():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, dropout=False) == "sdpa"
    assert "flash" not in available_backends(cpu, dropout=False)
    for name in ("flash", "varlen"):
        with pytest.raises(ModelConfigError, match=f"attn_backend='{name}' needs"):
            resolve_backend(name, cpu, dropout=False)
    with pytest.raises(ModelConfigError, match="no attention dropout"):
        resolve_backend("flex", cpu, dropout=True)


def test_a_float32_model_is_never_given_a_half_precision_kernel():
    """flash and varlen compute in bf16: a float32 model (precision fp32) gets sdpa or flex from auto, and
    forcing one is refused, where the kernels would have cast its attention to bf16 without a word."""
    cuda = torch.device("cuda")  # the choice alone: no kernel runs
    for name in ("flash", "varlen"):
        assert name not in available_backends(cuda, dropout=False, backward=True, half_precision=False)
        with pytest.raises(ModelConfigError, match=f"attn_backend='{name}' computes in bf16/fp16 only"):
            resolve_backend(name, cuda, dropout=False, backward=True, half_precision=False)
    values = dict(vocab_size=64, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    model = ModernBertForMaskedLM(ModernBertConfig.from_preset("tiny", **values)).model
    cpu = torch.device("cpu")
    assert not model._half_precision(cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model._half_precision(cpu)
    assert model.bfloat16()._half_precision(cpu)


def tiles_of(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A BlockMask's (num_blocks, indices) pair as a dense [q tiles, kv tiles] boolean matrix."""
    dense = torch.zeros(counts.shape[-1], indices.shape[-1], dtype=torch.bool)
    for row, (count, order) in enumerate(zip(counts[0, 0].tolist(), indices[0, 0])):
        dense[row, order[:count].long()] = True
    return dense


def test_flex_block_masks_agree_with_create_block_mask_over_many_tiles():
    """Masks from document boundaries, tile by tile: the same tiles as torch's create_block_mask (which
    evaluates every token pair) for documents; for the window, the same full tiles and a superset of its
    partial ones (mask_mod sorts those out); attention as the reference either way."""
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = [300, 50, 700, 1, 20, 130, 400]  # 1601 tokens: 13 tiles, the last one partly padding
    cu_seqlens = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    layout = DocumentLayout.from_cu_seqlens(cu_seqlens, max(lengths), sum(lengths))
    attention = build_attention("flex", layout, HALF_WINDOW)
    padded = attention.global_mask.shape[-1]
    doc = torch.full((padded,), -1)
    doc[: sum(lengths)] = layout.doc_ids

    def same_doc(b, h, q, kv):
        return doc[q] == doc[kv]

    def same_doc_near(b, h, q, kv):
        return (doc[q] == doc[kv]) & ((q - kv).abs() <= HALF_WINDOW)

    for ours, mask_mod, exact in (
        (attention.global_mask, same_doc, True),
        (attention.local_mask, same_doc_near, False),
    ):
        reference = create_block_mask(mask_mod, None, None, padded, padded, device="cpu")
        full = [tiles_of(m.full_kv_num_blocks, m.full_kv_indices) for m in (ours, reference)]
        partial = [tiles_of(m.kv_num_blocks, m.kv_indices) for m in (ours, reference)]
        assert torch.equal(full[0], full[1])
        assert torch.equal(partial[0], partial[1]) if exact else bool((partial[0] >= partial[1]).all())
    torch.manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, 2, 16)
    for local in (False, True):
        expected = reference_attention(qkv, lengths, HALF_WINDOW if local else None)
        assert (attention.attend(qkv, local, 0.0) - expected).abs().max().item() < 1e-5


def test_flex_block_masks_are_cheap_at_a_real_micro_batch():
    """96 rows x 1024 tokens: a mask over every token pair would hold 9.7e9 entries; tiles hold 768^2."""
    lengths = torch.tensor([300, 724] * 96)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).int()
    layout = DocumentLayout.from_cu_seqlens(cu_seqlens, 724, int(lengths.sum()))
    attention = build_attention("flex", layout, HALF_WINDOW)
    assert attention.global_mask.kv_num_blocks.shape == (1, 1, 768)
    # A query tile reaches key tiles of its own row (8 tiles) only, never the rest of the stream.
    mask = attention.global_mask
    assert int((mask.kv_num_blocks + mask.full_kv_num_blocks).max()) == 8


def test_flex_on_cpu_is_refused_for_training_where_it_cannot_backpropagate():
    """auto never picks a backend that cannot train here; forcing flex says why, before any work."""
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, dropout=False, backward=True) == "sdpa"
    assert resolve_backend("flex", cpu, dropout=False, backward=False) == "flex"  # inference runs anywhere
    values = dict(vocab_size=64, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    model = ModernBertForMaskedLM(ModernBertConfig.from_preset("tiny", attn_backend="flex", **values))
    ids = torch.randint(4, 64, (2, 20))
    with torch.no_grad():
        assert model(ids).logits.shape == (2, 20, 64)
    if _flex_backward_runs_on_cpu():
        assert "flex" in available_backends(cpu, dropout=False, backward=True)
        model(ids, labels=ids).loss.backward()
    else:
        assert "flex" not in available_backends(cpu, dropout=False, backward=True)
        with pytest.raises(ModelConfigError, match="attn_backend='flex' cannot train on a CPU"):
            model(ids, labels=ids)


def test_forcing_flash_on_cpu_fails_at_forward():
    values = dict(vocab_size=64, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    model = ModernBertForMaskedLM(ModernBertConfig.from_preset("tiny", attn_backend="flash", **values))
    with pytest.raises(ModelConfigError, match="attn_backend='flash' needs the flash-attn package"):
        model(torch.ones(1, 8, dtype=torch.long))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["flash", "varlen", "flex", "sdpa"])
def test_cuda_backends_match_the_reference(name):
    if name not in available_backends(torch.device("cuda"), dropout=False):
        pytest.skip(f"{name} is not available here")
    check_backend(name, "cuda", 2e-2)


@pytest.mark.gpu
@cuda
def test_auto_backend_model_on_cuda_matches_cpu():
    values = dict(vocab_size=64, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    model = ModernBertForMaskedLM(ModernBertConfig.from_preset("tiny", **values)).eval()
    ids = torch.randint(4, 64, (3, 50))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, False, True, half_precision=False) in ("flex", "sdpa")  # float32
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        got = model.cuda()(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() < 2e-2 * expected.abs().max()
