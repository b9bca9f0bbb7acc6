"""ModernBERT with a sequence-level head: the pretrained encoder and prediction head, mean-pooled, then a
fresh linear layer. Runs unpadded: a batch of examples is one flat token stream with cu_seqlens."""

import torch
from torch import nn

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.model.attention import DocumentLayout
from modernbert_train.model.layers import ModernBertPredictionHead


class ModernBertForSequenceClassification(nn.Module):
    """num_labels outputs per example: class logits, or one value for regression (num_labels=1).

    The encoder's final states are averaged over each example's tokens, then go through a fresh head
    (dense, activation, norm, as the masked-LM head) and the classifier. The masked-LM head is left
    behind: it is shaped to feed the vocabulary decoder, and in a briefly pretrained model it maps every
    input to nearly the same vector, which fine-tuning then struggles to move."""

    def __init__(self, masked_lm: ModernBertForMaskedLM, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.config: ModernBertConfig = masked_lm.config
        self.model = masked_lm.model
        self.head = ModernBertPredictionHead(self.config)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=self.config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """input_ids [T] of D examples end to end (cu_seqlens int32 [D + 1]) -> logits [D, num_labels]."""
        layout = DocumentLayout.from_cu_seqlens(cu_seqlens, max_seqlen, input_ids.shape[0])
        hidden = self.model(input_ids, layout)
        sums = hidden.new_zeros(layout.num_docs, hidden.shape[1]).index_add_(0, layout.doc_ids, hidden)
        pooled = sums / cu_seqlens.diff().unsqueeze(1).to(hidden.dtype)
        return self.classifier(self.drop(self.head(pooled)))
