"""Rotary position embeddings, rotate-half convention (as transformers' ModernBERT, so weights transfer)."""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Maps token positions to the (cos, sin) tables that rotate queries and keys."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        # Not persistent: it is derived from the config, and transformers' checkpoints do not hold it.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, head_dim / 2] in fp32, one column per frequency (rotate-half
        uses each twice), broadcast over heads; apply_rotary casts them to the qkv dtype."""
        angles = positions.float()[:, None] * self.inv_freq.float()[None, :]
        return angles.cos()[:, None], angles.sin()[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half on x [T, H, D]: with halves (x1, x2), the result is (x1 cos - x2 sin, x2 cos + x1 sin)."""
    first, second = x.unflatten(-1, (2, -1)).unbind(-2)
    rotated = (torch.addcmul(first * cos, second, sin, value=-1), torch.addcmul(second * cos, first, sin))
    return torch.stack(rotated, dim=-2).flatten(-2)


def apply_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the queries and keys of qkv [T, 3, H, D]; values pass through. Returns a new [T, 3, H, D].

    Unbound and stacked, not sliced and concatenated: the backward pass then stacks the gradients, where
    slices would each zero-fill a qkv-sized gradient."""
    cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
    query, key, value = qkv.unbind(1)
    return torch.stack((rotate(query, cos, sin), rotate(key, cos, sin), value), dim=1)
