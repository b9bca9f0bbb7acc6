"""Weight initialisation as transformers' ModernBERT: truncated normals, output projections scaled down.

Inputs (Wqkv, MLP Wi) and the token embeddings (shared with the decoder) draw from
N(0, initializer_range); the projections that write into the residual stream (attention Wo, MLP Wo) and
the head's dense layer use initializer_range / sqrt(2 * num_layers) ("full megatron" scaling), so the
residual stream's variance does not grow with depth. Every draw is cut at initializer_cutoff_factor std.
Norm weights are ones and all biases zeros.
"""

import math

import torch
from torch import nn


def _truncated_normal(weight: torch.Tensor, std: float, cutoff_factor: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-cutoff_factor * std, b=cutoff_factor * std)


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Initialise a ModernBertForMaskedLM in place."""
    config = model.config
    cutoff = config.initializer_cutoff_factor
    std_in = config.initializer_range
    std_out = config.initializer_range / math.sqrt(2.0 * config.num_hidden_layers)
    out_projections = set()
    for layer in model.model.layers:
        out_projections.update((id(layer.attn.Wo.weight), id(layer.mlp.Wo.weight)))
    out_projections.add(id(model.head.dense.weight))
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
        if isinstance(module, nn.Embedding | nn.Linear):
            std = std_out if id(module.weight) in out_projections else std_in
            _truncated_normal(module.weight, std, cutoff)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
