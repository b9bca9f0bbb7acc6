"""ModernBERT's building blocks on the unpadded layout (tokens [T, hidden]); names as in transformers."""

import torch
from torch import nn

from .config import ModernBertConfig
from .rope import apply_rotary

ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def layer_norm(config: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class ModernBertEmbeddings(nn.Module):
    """Token embeddings, normed; no absolute positions (RoPE carries them)."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        # padding_idx as transformers: the pad row gets no gradient from the lookup.
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.norm = layer_norm(config)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.tok_embeddings(input_ids)))


class ModernBertAttention(nn.Module):
    """Fused QKV projection, rotary embeddings, then the batch's attention backend."""

    def __init__(self, config: ModernBertConfig, layer_id: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.is_global = config.is_global_layer(layer_id)
        self.dropout = config.attention_dropout
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.out_drop = nn.Dropout(config.attention_dropout)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """keep: output only these tokens' rows (every token still serves as a key and a value)."""
        tokens = hidden.shape[0]
        qkv = self.Wqkv(hidden).view(tokens, 3, self.num_heads, self.head_dim)
        qkv = apply_rotary(qkv, *rotary)
        out = attention.attend(qkv, not self.is_global, self.dropout if self.training else 0.0)
        out = out.reshape(tokens, -1)
        if keep is not None:
            out = out.index_select(0, keep)
        return self.out_drop(self.Wo(out))


class ModernBertMLP(nn.Module):
    """GeGLU: Wi projects to input and gate halves; Wo(dropout(act(input) * gate))."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_activation]()
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        input, gate = self.Wi(hidden).chunk(2, dim=-1)
        return self.Wo(self.drop(self.act(input) * gate))


class ModernBertEncoderLayer(nn.Module):
    """Pre-norm block; layer 0 skips the attention norm because the embeddings were just normed."""

    def __init__(self, config: ModernBertConfig, layer_id: int):
        super().__init__()
        self.attn_norm = nn.Identity() if layer_id == 0 else layer_norm(config)
        self.attn = ModernBertAttention(config, layer_id)
        self.mlp_norm = layer_norm(config)
        self.mlp = ModernBertMLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [T, hidden] -> [T, hidden], or one row per position in `keep`: past attention only those
        tokens go on (attention output projection, residual, MLP)."""
        out = self.attn(self.attn_norm(hidden), rotary, attention, keep)
        hidden = (hidden if keep is None else hidden.index_select(0, keep)) + out
        return hidden + self.mlp(self.mlp_norm(hidden))


class ModernBertPredictionHead(nn.Module):
    """dense -> activation -> norm, before the (tied) decoder."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = ACTIVATIONS[config.classifier_activation]()
        self.norm = layer_norm(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))
