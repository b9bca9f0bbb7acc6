"""Downstream fine-tuning of an exported encoder (a transformers ModernBERT folder) on labelled text.

Uses the model through its public pieces only (ModernBertModel, the prediction head, from_hf): no Composer
and no pretraining data code, so it runs wherever the model does.
"""

from .data import Examples, FinetuneError, read_examples
from .model import ModernBertForSequenceClassification
from .train import FinetuneSettings, finetune

__all__ = [
    "Examples",
    "FinetuneError",
    "FinetuneSettings",
    "ModernBertForSequenceClassification",
    "finetune",
    "read_examples",
]
