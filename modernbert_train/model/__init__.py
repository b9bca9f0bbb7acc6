"""ModernBERT: config, model and the pieces it is built from. Imports neither Composer nor data code."""

from .config import ModelConfigError, ModernBertConfig, pad_vocab_size
from .flops import flops_per_token, training_flops
from .modeling import MaskedLMOutput, ModernBertForMaskedLM, ModernBertModel

__all__ = [
    "MaskedLMOutput",
    "ModelConfigError",
    "ModernBertConfig",
    "ModernBertForMaskedLM",
    "ModernBertModel",
    "flops_per_token",
    "pad_vocab_size",
    "training_flops",
]
