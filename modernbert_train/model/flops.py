"""Training FLOPs, for model FLOPs utilisation (MFU), counted for what actually runs.

Every token goes through the encoder; only the labelled (masked) tokens go through the prediction head
and the vocabulary-sized decoder (sparse prediction), so those two are counted per labelled token.
"""

from .config import ModernBertConfig

# ModernBERT's masking ratio: the share of tokens that carry a label when a batch is not at hand.
MLM_PROBABILITY = 0.3


def encoder_flops_per_token(config: ModernBertConfig, seq_len: int) -> float:
    """Training FLOPs of one token through the encoder: 6 per matmul weight (forward 2, backward 4), plus
    attention's scores and mixing, 12 * hidden * context per layer (QK^T and AV, forward and backward).

    A local layer's context is its window, 2 * (local_attention // 2) + 1 tokens, when that is shorter
    than the sequence; the embedding lookup is free.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = 4 * hidden * hidden + 3 * hidden * config.intermediate_size
    local_context = min(seq_len, 2 * (config.local_attention // 2) + 1)
    contexts = sum(seq_len if config.is_global_layer(i) else local_context for i in range(layers))
    return 6.0 * layers * per_layer + 12.0 * hidden * contexts


def head_flops_per_labelled_token(config: ModernBertConfig) -> float:
    """Training FLOPs of one labelled token through the head's dense layer and the (tied) decoder."""
    hidden = config.hidden_size
    return 6.0 * (hidden * hidden + hidden * config.vocab_size)


def training_flops(config: ModernBertConfig, seq_len: int, tokens: int, labelled_tokens: int) -> float:
    """Training FLOPs of a step over `tokens` real tokens in rows of `seq_len`, `labelled_tokens` of them
    labelled."""
    return tokens * encoder_flops_per_token(
        config, seq_len
    ) + labelled_tokens * head_flops_per_labelled_token(config)


def flops_per_token(
    config: ModernBertConfig, seq_len: int, labelled_fraction: float = MLM_PROBABILITY
) -> float:
    """Training FLOPs per token when `labelled_fraction` of the tokens carry a label
    (base at 1024 tokens and 30% masking: 0.8246 GFLOP/token)."""
    return encoder_flops_per_token(config, seq_len) + labelled_fraction * head_flops_per_labelled_token(
        config
    )
