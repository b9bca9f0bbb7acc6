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
        """positions [T] -> cos, sin [T, head_dim] in fp32 (apply_rotary casts them to the qkv dtype)."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the queries and keys of qkv [T, 3, H, D]; values pass through. Returns a new [T, 3, H, D]."""
    cos, sin = cos.to(qkv.dtype)[:, None, None, :], sin.to(qkv.dtype)[:, None, None, :]
    qk, v = qkv[:, :2], qkv[:, 2:]
    return torch.cat((qk * cos + rotate_half(qk) * sin, v), dim=1)
