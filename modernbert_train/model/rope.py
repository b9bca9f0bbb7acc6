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
        """positions [T] -> cos, sin [T, 3, 1, head_dim / 2] in fp32 (apply_rotary casts them to the qkv
        dtype), laid out for a whole qkv: the query and key slots rotate, the value slot is the identity
        (cos 1, sin 0), so rotating never slices qkv apart and glues it back (copies, and zero-filled
        gradients in the backward pass)."""
        angles = positions.float()[:, None] * self.inv_freq.float()[None, :]
        cos, sin = angles.cos(), angles.sin()
        return (
            torch.stack((cos, cos, torch.ones_like(cos)), dim=1)[:, :, None],
            torch.stack((sin, sin, torch.zeros_like(sin)), dim=1)[:, :, None],
        )


def apply_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the queries and keys of qkv [T, 3, H, D]; values pass through. Returns a new [T, 3, H, D].

    Rotate-half: with x = (x1, x2) split in halves, the result is (x1 cos - x2 sin, x2 cos + x1 sin)."""
    cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
    first, second = qkv.unflatten(-1, (2, -1)).unbind(-2)
    return torch.stack((first * cos - second * sin, second * cos + first * sin), dim=-2).flatten(-2)
