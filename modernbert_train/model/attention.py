"""Attention backends over the unpadded layout.

Every backend computes the same function: bidirectional softmax attention within each document of a
flat token stream, optionally restricted to a sliding window of +-`half_window` tokens (transformers'
ModernBERT local layers: |i - j| <= local_attention // 2). A backend is built once per forward pass from
the batch's `DocumentLayout`, holds whatever masks or indices it needs, and is then used by every layer:

    attention = build_attention(name, layout, half_window)
    out = attention.attend(qkv, local, dropout_p)   # qkv [T, 3, H, D] (rotary applied) -> [T, H, D]

A method rather than `__call__`: torch.compile guards an object that is called by its identity, and a new
one every batch would recompile every batch; a method's object is guarded by type and attributes.
"""

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfigError


@dataclass
class DocumentLayout:
    """Where each document sits in a flat stream of T tokens; computed once per forward."""

    cu_seqlens: torch.Tensor  # int32 [D + 1]
    max_seqlen: int
    doc_ids: torch.Tensor  # int64 [T], the document of each token
    positions: torch.Tensor  # int64 [T], position within its document

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int) -> "DocumentLayout":
        device = cu_seqlens.device
        docs = torch.arange(len(cu_seqlens) - 1, device=device)
        # output_size spares a device sync on GPUs.
        doc_ids = torch.repeat_interleave(docs, cu_seqlens.diff(), output_size=num_tokens)
        positions = torch.arange(num_tokens, device=device) - cu_seqlens[doc_ids].long()
        return cls(cu_seqlens.int(), max_seqlen, doc_ids, positions)

    @property
    def num_docs(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.doc_ids)


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_qkvpacked_func
    except ImportError:
        return None
    return flash_attn_varlen_qkvpacked_func


@functools.cache
def _varlen_attn_func():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    # The first release (torch 2.9) had no sliding window, which local layers need.
    return varlen_attn if "window_size" in inspect.signature(varlen_attn).parameters else None


@functools.cache
def _flex_attention_funcs(compiled: bool):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    # Eager FlexAttention materialises the full score matrix; on GPUs it must be compiled to be fast.
    return (torch.compile(flex_attention) if compiled else flex_attention), create_block_mask


@functools.cache
def _flex_backward_runs_on_cpu() -> bool:
    """Whether eager FlexAttention can backpropagate on a CPU with this torch (2.7 can; 2.11 raises
    NotImplementedError). Asked of torch once with a tiny problem rather than guessed from its version."""
    flex_attention, _ = _flex_attention_funcs(False)
    query = torch.zeros(1, 1, 4, 2, requires_grad=True)
    try:
        flex_attention(query, query, query).sum().backward()
    except (NotImplementedError, RuntimeError):
        return False
    return True


def available_backends(
    device: torch.device, dropout: bool, backward: bool = False, half_precision: bool = True
) -> list[str]:
    """The backends that can run on `device`, best first. dropout: whether attention dropout is on;
    backward: whether the pass must also backpropagate (training); half_precision: whether the attention
    inputs are bf16 or fp16 (autocast, or a half-precision model). flash and varlen compute in half
    precision only, so a float32 model is never given them: its attention would silently be bf16."""
    cuda = device.type == "cuda" and half_precision
    found = []
    if cuda and _flash_attn_func() is not None:
        found.append("flash")
    # varlen and FlexAttention have no attention dropout.
    if cuda and not dropout and _varlen_attn_func() is not None:
        found.append("varlen")
    if (
        not dropout
        and _flex_attention_funcs(False) is not None
        and (device.type == "cuda" or not backward or _flex_backward_runs_on_cpu())
    ):
        found.append("flex")
    return found + ["sdpa"]


def resolve_backend(
    name: str, device: torch.device, dropout: bool, backward: bool = False, half_precision: bool = True
) -> str:
    """Pick the backend for `auto`, or check that a forced one can run here (and train, with backward)."""
    usable = available_backends(device, dropout, backward, half_precision)
    if name == "auto":
        # Eager FlexAttention on a CPU is slower than SDPA, so auto only takes it on a GPU.
        return next(b for b in usable if device.type == "cuda" or b != "flex")
    if name not in usable:
        why = {
            "flash": "needs the flash-attn package and a CUDA device",
            "varlen": "needs torch.nn.attention.varlen with window_size (newer torch) and a CUDA device",
            "flex": "needs torch FlexAttention",
        }[name]
        if name in ("flash", "varlen") and device.type == "cuda" and not half_precision:
            why = "computes in bf16/fp16 only and this model runs in float32 (use precision amp_bf16)"
        if name == "flex" and not dropout and backward and _flex_attention_funcs(False) is not None:
            why = f"cannot train on a CPU with torch {torch.__version__} (FlexAttention has no CPU backward)"
        extra = (
            "; varlen and flex have no attention dropout" if dropout and name in ("varlen", "flex") else ""
        )
        raise ModelConfigError(f"model config: attn_backend={name!r} {why}{extra}; usable here: {usable}")
    return name


class SdpaAttention:
    """F.scaled_dot_product_attention over documents padded to [docs, H, max_seqlen, D].

    The scatter index and the boolean masks (key padding, and key padding & window) are built once
    here and shared by all layers. When every document has max_seqlen tokens, padding is a free view.
    """

    def __init__(self, layout: DocumentLayout, half_window: int | None):
        docs, length = layout.num_docs, layout.max_seqlen
        self.docs, self.length = docs, length
        dense = layout.num_tokens == docs * length
        self.index = None if dense else layout.doc_ids * length + layout.positions
        device = layout.doc_ids.device
        slots = torch.arange(length, device=device)
        # An empty document keeps one (padding) key so that its rows never softmax over nothing.
        key_valid = slots[None, :] < layout.cu_seqlens.diff().clamp(min=1)[:, None]  # [docs, L]
        self.global_mask = None if dense else key_valid[:, None, None, :]
        if half_window is None or length - 1 <= half_window:
            self.local_mask = self.global_mask
            return
        near = (slots[:, None] - slots[None, :]).abs() <= half_window  # [L, L]
        if dense:
            self.local_mask = near
        else:
            # A padding query may have no valid key in its window; letting it see itself avoids NaNs.
            self.local_mask = (
                near & key_valid[:, None, :] | torch.eye(length, dtype=torch.bool, device=device)
            )[:, None]

    def attend(self, qkv: torch.Tensor, local: bool, dropout_p: float) -> torch.Tensor:
        _, _, heads, head_dim = qkv.shape
        rows = self.docs * self.length
        if self.index is None:
            padded = qkv
        else:
            padded = qkv.new_zeros(rows, 3, heads, head_dim).index_copy(0, self.index, qkv)
        query, key, value = padded.view(self.docs, self.length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        mask = self.local_mask if local else self.global_mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(rows, heads, head_dim)
        return out if self.index is None else out[self.index]


class FlexAttention:
    """FlexAttention over the flat stream with document-id (+ window) block masks, built once per batch.

    The block masks are worked out from the document boundaries, 128 x 128 tiles at a time, not by
    evaluating the mask over every (query, key) pair as `create_block_mask` does: that costs time and memory
    quadratic in the tokens (a 96 x 1024 micro-batch would need a 98k x 98k mask), this the square of the
    tiles. Documents are contiguous and numbered in order along the stream, so two tiles share one exactly
    when their ranges of document ids overlap.
    """

    BLOCK = 128

    def __init__(self, layout: DocumentLayout, half_window: int | None):
        from torch.nn.attention.flex_attention import BlockMask

        device = layout.doc_ids.device
        self.flex_attention, _ = _flex_attention_funcs(device.type == "cuda")
        self.tokens = layout.num_tokens
        tiles = -(-self.tokens // self.BLOCK)
        padded_len = tiles * self.BLOCK
        # Padding tokens form a document of their own after the last, so no query row is empty.
        doc = torch.full((padded_len,), layout.num_docs, dtype=torch.long, device=device)
        doc[: self.tokens] = layout.doc_ids
        first, last = doc[:: self.BLOCK], doc[self.BLOCK - 1 :: self.BLOCK]
        shared = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])  # [tiles, tiles]
        single = first == last
        one_doc = shared & single[:, None] & single[None, :]  # every pair of the two tiles: one document

        def same_doc(b, h, q, kv):
            return doc[q] == doc[kv]

        def same_doc_near(b, h, q, kv):
            return (doc[q] == doc[kv]) & ((q - kv).abs() <= half_window)

        def block_mask(some: torch.Tensor, every: torch.Tensor, mask_mod) -> BlockMask:
            """`some`: tiles where some pairs attend (mask_mod decides which); `every`: tiles where all do."""

            def sparse(tiles_on: torch.Tensor):
                counts = tiles_on.sum(dim=-1, dtype=torch.int32)
                order = torch.argsort((~tiles_on).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
                return counts[None, None], order[None, None]

            return BlockMask.from_kv_blocks(
                *sparse(some & ~every), *sparse(every), BLOCK_SIZE=self.BLOCK, mask_mod=mask_mod,
                seq_lengths=(padded_len, padded_len),
            )  # fmt: skip

        self.global_mask = block_mask(shared, one_doc, same_doc)
        if half_window is None:
            self.local_mask = self.global_mask
            return
        # Tiles i and j: their closest tokens are |i - j| * BLOCK - (BLOCK - 1) apart, their farthest
        # (|i - j| + 1) * BLOCK - 1. Tiles that share a document within reach may still hold no near pair;
        # mask_mod then masks them out, which costs a little work, never a wrong result.
        apart = (torch.arange(tiles, device=device)[:, None] - torch.arange(tiles, device=device)).abs()
        reach = shared & (apart * self.BLOCK - (self.BLOCK - 1) <= half_window)
        self.local_mask = block_mask(
            reach, one_doc & ((apart + 1) * self.BLOCK - 1 <= half_window), same_doc_near
        )

    def attend(self, qkv: torch.Tensor, local: bool, dropout_p: float) -> torch.Tensor:
        padded_len = self.global_mask.shape[-2]
        qkv = F.pad(qkv, (0, 0, 0, 0, 0, 0, 0, padded_len - self.tokens))
        query, key, value = qkv.permute(1, 2, 0, 3)[:, None].unbind(0)  # each [1, H, T, D]
        block_mask = self.local_mask if local else self.global_mask
        out = self.flex_attention(query, key, value, block_mask=block_mask)
        return out[0].transpose(0, 1)[: self.tokens]


class FlashAttention:
    """flash-attn's varlen kernel; it runs in half precision, so fp32 inputs are cast to bf16 and back."""

    def __init__(self, layout: DocumentLayout, half_window: int | None):
        self.layout = layout
        self.local_window = (-1, -1) if half_window is None else (half_window, half_window)

    def attend(self, qkv: torch.Tensor, local: bool, dropout_p: float) -> torch.Tensor:
        dtype = qkv.dtype
        half = qkv if dtype in (torch.float16, torch.bfloat16) else qkv.to(torch.bfloat16)
        out = _flash_attn_func()(
            half,
            self.layout.cu_seqlens,
            self.layout.max_seqlen,
            dropout_p=dropout_p,
            window_size=self.local_window if local else (-1, -1),
        )
        return out.to(dtype)


class VarlenAttention(FlashAttention):
    """torch.nn.attention.varlen (newer torch, CUDA), same contract as flash-attn's kernel."""

    def attend(self, qkv: torch.Tensor, local: bool, dropout_p: float) -> torch.Tensor:
        dtype = qkv.dtype
        half = qkv if dtype in (torch.float16, torch.bfloat16) else qkv.to(torch.bfloat16)
        query, key, value = half.unbind(1)
        cu, longest = self.layout.cu_seqlens, self.layout.max_seqlen
        window = self.local_window if local else (-1, -1)
        out = _varlen_attn_func()(query, key, value, cu, cu, longest, longest, window_size=window)
        return out.to(dtype)


BACKENDS = {"sdpa": SdpaAttention, "flex": FlexAttention, "flash": FlashAttention, "varlen": VarlenAttention}


def build_attention(name: str, layout: DocumentLayout, half_window: int | None):
    """The resolved backend `name`, prepared for this batch."""
    return BACKENDS[name](layout, half_window)
