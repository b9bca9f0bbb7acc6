"""ModernBertForMaskedLM as a ComposerModel: packed batches in, unpadded forward, MLM loss and metrics."""

import torch
import torch.nn.functional as F
from composer.core import DataSpec
from composer.models import ComposerModel
from torchmetrics import MeanMetric, Metric

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM, training_flops
from modernbert_train.model.layers import ModernBertEncoderLayer
from modernbert_train.model.modeling import IGNORE_INDEX


def packed_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The model's unpadded inputs for a packed (micro-)batch, keeping every slot of every row.

    The token count is then rows x seq_len whatever the packing, so compiled graphs see one shape. Each
    row's padding tail is a document of its own (rows hold whole documents first, padding after): no real
    token attends to it and its labels are all -100, so the loss and every gradient are those of the real
    tokens alone, for under 1% more encoder work on rows packed over 99% full.

    Computed where the batch is: on the host, when Composer splits the batch (`split_batch`), so the
    device is never asked for a maximum or a count (each would be a sync). A batch in pinned memory (the
    loaders pin on CUDA) gets its new tensors pinned too, so that all of a micro-batch's copies to the device
    are asynchronous.
    """
    input_ids, labels, seq_lens = batch["input_ids"], batch["labels"], batch["seq_lens"]
    seq_len = input_ids.shape[1]
    padding = seq_len - seq_lens.sum(dim=1, keepdim=True, dtype=seq_lens.dtype)
    lengths = torch.cat((seq_lens, padding), dim=1).flatten()
    lengths = lengths[lengths > 0]
    labels = labels.reshape(-1)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    labelled_index = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if input_ids.is_pinned():
        cu_seqlens, labelled_index = cu_seqlens.pin_memory(), labelled_index.pin_memory()
    return {
        "input_ids": input_ids.reshape(-1),  # views: pinned when the batch is
        "labels": labels,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(lengths.max()),
        "labelled_index": labelled_index,
    }


def token_counts(batch: dict) -> dict[str, int]:
    """Composer's token counts: `total`, the real tokens (the clock, throughput), and `loss_generating`, the
    labelled ones. With `accumulate_train_batch_on_tokens` each micro-batch's mean loss is weighted by its
    labelled tokens over the ranks' average, so the gradient is the mean over every labelled token of the
    global batch, whatever the micro-batch size and world size (weighted by rows, it would not be).
    A split micro-batch carries its counts, taken on the host (on the device each would be a sync)."""
    if "token_counts" in batch:
        return batch["token_counts"]
    return {
        "total": int(batch["attention_mask"].sum()),
        "loss_generating": int((batch["labels"] != IGNORE_INDEX).sum()),
    }


def split_batch(batch: dict[str, torch.Tensor], microbatch_size: int) -> list[dict]:
    """Composer's split into micro-batches of rows, each carrying its `packed_inputs` and `token_counts`
    (made here, on the host: Composer moves each micro-batch to the device after splitting)."""
    rows = batch["input_ids"].shape[0]
    micro_batches = [
        {key: value[start : start + microbatch_size] for key, value in batch.items()}
        for start in range(0, rows, microbatch_size)
    ]
    return [
        {**micro, "packed": packed_inputs(micro), "token_counts": token_counts(micro)}
        for micro in micro_batches
    ]


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
        inputs = batch["packed"] if "packed" in batch else packed_inputs(batch)
        # Training needs only the loss: the chunked cross-entropy, no [masked tokens x vocab] logits.
        # Evaluation keeps the logits for its accuracy.
        return self.model(**inputs, return_logits=not self.training)

    def loss(self, outputs, batch):
        return outputs.loss

    def eval_forward(self, batch, outputs=None):
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        # Train loss is logged every step already; metrics are for the held-out split.
        return {} if is_train else self.eval_metrics

    def update_metric(self, batch, outputs, metric: Metric) -> None:
        labels = batch["labels"][batch["labels"] != IGNORE_INDEX]
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
        split_batch=split_batch,
        get_num_samples_in_batch=lambda batch: batch["input_ids"].shape[0],
        get_num_tokens_in_batch=token_counts,
    )
