"""ModernBertForMaskedLM as a ComposerModel: packed batches in, unpadded forward, MLM loss and metrics."""

import torch
import torch.nn.functional as F
from composer.core import DataSpec
from composer.models import ComposerModel
from torchmetrics import MeanMetric, Metric

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM, training_flops
from modernbert_train.model.layers import ModernBertEncoderLayer


def unpad(batch: dict[str, torch.Tensor]) -> dict:
    """Real tokens flattened row by row, and document boundaries from `seq_lens`.

    Rows hold whole documents first and padding after, so row-major boolean indexing keeps document order.
    """
    real = batch["attention_mask"].bool()
    seq_lens = batch["seq_lens"]
    doc_lens = seq_lens[seq_lens > 0]
    cu_seqlens = F.pad(doc_lens.cumsum(0, dtype=torch.int32), (1, 0))
    return {
        "input_ids": batch["input_ids"][real],
        "labels": batch["labels"][real],
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(doc_lens.max()),
    }


class MLMLoss(MeanMetric):
    """Cross-entropy over masked tokens, weighted by how many each batch has."""


class MLMAccuracy(MeanMetric):
    """Share of masked tokens predicted exactly."""


class ModernBertMLM(ComposerModel):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.model = ModernBertForMaskedLM(config)
        # FSDP: one unit per encoder layer (Composer's policy asks the child model), so only one layer's
        # parameters are gathered at a time; embeddings, head and the tied decoder share the root unit.
        self.model.fsdp_wrap_fn = lambda module: isinstance(module, ModernBertEncoderLayer)
        self.eval_metrics = {"MLMLoss": MLMLoss(), "MLMAccuracy": MLMAccuracy()}

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(**unpad(batch))

    def loss(self, outputs, batch):
        return outputs.loss

    def eval_forward(self, batch, outputs=None):
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        # Train loss is logged every step already; metrics are for the held-out split.
        return {} if is_train else self.eval_metrics

    def update_metric(self, batch, outputs, metric: Metric) -> None:
        labels = batch["labels"][batch["labels"] != -100]
        # Composer hands each evaluator a copy of the metrics, so tell them apart by type.
        if isinstance(metric, MLMLoss):
            metric.update(outputs.loss.detach(), weight=labels.numel())
        else:
            metric.update((outputs.logits.argmax(-1) == labels).float())

    def flops_per_batch(self, batch) -> float:
        """Training FLOPs of what runs, for SpeedMonitor's flops/s and MFU: the real tokens through the
        encoder, the labelled ones through the head and decoder."""
        tokens = int(batch["attention_mask"].sum())
        labelled = int((batch["labels"] != -100).sum())
        return training_flops(self.config, batch["input_ids"].shape[1], tokens, labelled)


def data_spec(dataloader) -> DataSpec:
    return DataSpec(
        dataloader,
        get_num_samples_in_batch=lambda batch: batch["input_ids"].shape[0],
        get_num_tokens_in_batch=lambda batch: int(batch["attention_mask"].sum()),
    )
