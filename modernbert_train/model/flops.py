"""Training FLOPs per token, for model FLOPs utilisation (MFU)."""

from .config import ModernBertConfig


def flops_per_token(config: ModernBertConfig, seq_len: int) -> float:
    """6 FLOPs per matmul weight (forward 2, backward 4) plus the attention scores and mixing.

    The matmul weights are every linear layer's, the head's dense and the decoder (tied to the embeddings
    but still a matmul over the vocabulary); the embedding lookup is free. Attention adds
    12 * hidden * context per layer (QK^T and AV, forward and backward), where a local layer's context is
    its window, 2 * (local_attention // 2) + 1 tokens, when that is shorter than the sequence.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = 4 * hidden * hidden + 3 * hidden * config.intermediate_size
    matmul_weights = layers * per_layer + hidden * hidden + hidden * config.vocab_size
    local_context = min(seq_len, 2 * (config.local_attention // 2) + 1)
    contexts = sum(seq_len if config.is_global_layer(i) else local_context for i in range(layers))
    return 6.0 * matmul_weights + 12.0 * hidden * contexts
