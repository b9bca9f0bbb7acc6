"""ModernBERT for masked language modelling, run unpadded end to end.

A padded batch (input_ids [B, S], attention_mask) is unpadded once into a flat token stream with
cu_seqlens; a packed batch arrives that way already. Every layer runs on the flat stream, attention stays
within documents, and only the labelled tokens go through the head and the vocabulary-sized decoder (and,
with labels, through the last layer past its attention: nothing reads the other tokens' final states).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from .attention import DocumentLayout, build_attention, resolve_backend
from .config import ModernBertConfig
from .init import init_weights
from .layers import ModernBertEmbeddings, ModernBertEncoderLayer, ModernBertPredictionHead, layer_norm
from .loss import linear_cross_entropy
from .rope import RotaryEmbedding

IGNORE_INDEX = -100


@dataclass
class MaskedLMOutput:
    """loss: mean cross-entropy over labelled tokens, or None without labels.
    logits: [N, V] for the N labelled tokens when labels are given; else [B, S, V] for padded input
    (zeros at padding) or [T, V] for unpadded input. None when the call said return_logits=False."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None


# Visible to pytree, as transformers' outputs are: FSDP2 finds a sharded module's output tensors by pytree
# to hook the backward pass that reduce-scatters gradients into the sharded parameters; an opaque output
# would leave them on unsharded copies, and every optimizer step would do nothing.
pytree.register_pytree_node(
    MaskedLMOutput, lambda out: ([out.loss, out.logits], None), lambda values, _: MaskedLMOutput(*values)
)


LAYER_GRAPHS = 64  # compiled graphs kept per code object: see ModernBertModel.compile_layers


class ModernBertModel(nn.Module):
    """Embeddings, the encoder layers and the final norm, over a flat token stream."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(
            ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.final_norm = layer_norm(config)
        local_theta = config.local_rope_theta or config.global_rope_theta
        self.rotary_global = RotaryEmbedding(config.head_dim, config.global_rope_theta)
        self.rotary_local = RotaryEmbedding(config.head_dim, local_theta)
        self.has_local_layers = config.num_hidden_layers > 1 and config.global_attn_every_n_layers > 1

    def forward(
        self, input_ids: torch.Tensor, layout: DocumentLayout, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids [T] laid out as `layout` says -> final hidden states [T, hidden].

        keep (int64 [N]): only these positions' final states are wanted ([N, hidden] returned). The last
        layer then runs its attention output projection and MLP for them alone; the other tokens' final
        states feed nothing, so the kept ones are exactly as without `keep`."""
        config = self.config
        dropout = self.training and config.attention_dropout > 0
        backward = torch.is_grad_enabled()
        half = self._half_precision(input_ids.device)
        backend = resolve_backend(config.attn_backend, input_ids.device, dropout, backward, half)
        half_window = config.local_attention // 2 if self.has_local_layers else None
        # Built once per forward and shared by all layers. Outside `encode`: the backend is picked by
        # probing what this torch and device can run, and FlexAttention's block masks are made by calls
        # torch.compile cannot trace.
        attention = build_attention(backend, layout, half_window)
        return self.encode(input_ids, layout.positions, attention, keep)

    def _half_precision(self, device: torch.device) -> bool:
        """Whether the attention inputs are bf16/fp16 here: autocast's dtype, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = self.embeddings.tok_embeddings.weight.dtype
        return dtype in (torch.float16, torch.bfloat16)

    def encode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The encoder proper, tensor work only: torch.compile takes it as one graph without breaks.
        The rotary tables are made once here and shared by all layers."""
        rotary_global = self.rotary_global(positions)
        rotary_local = self.rotary_local(positions) if self.has_local_layers else None
        hidden = self.embeddings(input_ids)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rotary = rotary_global if layer.attn.is_global else rotary_local
            hidden = layer(hidden, rotary, attention, keep if i == last else None)
        return self.final_norm(hidden)

    def compile_layers(self, backend="inductor") -> None:
        """torch.compile each encoder layer in place (parameter names unchanged, so checkpoints and exports
        are the same compiled or not), with dynamic shapes: the token count varies per batch.

        All layers share one forward, hence one compile cache, which needs up to 3 layer kinds (global,
        local, the last with `keep`) x training or evaluation x a batch with or without a scatter index
        (every row one whole document) x a local mask of its own or the global one (documents shorter than
        the window) = 24 graphs. torch runs a function eager past its recompile limit (default 8, with one
        warning line), so the limit is raised to LAYER_GRAPHS."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, LAYER_GRAPHS)
        for layer in self.layers:
            layer.compile(backend=backend, dynamic=True)


class ModernBertForMaskedLM(nn.Module):
    """ModernBERT with its MLM head; the decoder shares its weight with the token embeddings."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight
        init_weights(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labelled_index: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> MaskedLMOutput:
        """Padded: input_ids [B, S] (attention_mask 1 on real tokens, right padding), labels [B, S].
        Unpadded/packed: input_ids [T], cu_seqlens int32 [D + 1], optional max_seqlen, labels [T], and
        optionally labelled_index int64 [N], the positions in [T] whose label is not -100, ascending.
        max_seqlen and labelled_index given by a caller that knows them on the host spare the device
        a sync each; max_seqlen must be at least the longest document (checked on a CPU only).

        return_logits=False (training, with labels): the loss comes from a chunked cross-entropy that
        never holds the [N, vocab] logits, and the output's logits are None."""
        indices = batch = seq_len = None
        if cu_seqlens is None:
            if input_ids.dim() != 2:
                raise ValueError(
                    f"input_ids must be [batch, seq] without cu_seqlens, got {list(input_ids.shape)}"
                )
            batch, seq_len = input_ids.shape
            input_ids, indices, cu_seqlens, max_seqlen = unpad(input_ids, attention_mask)
            if labels is not None:
                labels = labels.reshape(-1) if indices is None else labels.reshape(-1)[indices]
        else:
            if input_ids.dim() != 1:
                raise ValueError(
                    f"input_ids must be flat [tokens] with cu_seqlens, got {list(input_ids.shape)}"
                )
            if max_seqlen is None:
                max_seqlen = int(cu_seqlens.diff().max())
            elif cu_seqlens.device.type == "cpu":
                # A short max_seqlen mixes documents up in attention. Checked on a CPU only, reading the
                # tensor's memory in place (no device, nothing to sync); a GPU's check would cost a sync.
                longest = int(np.diff(cu_seqlens.numpy()).max(initial=0))
                if max_seqlen < longest:
                    raise ValueError(
                        f"max_seqlen={max_seqlen} is below the longest document ({longest} tokens)"
                    )
        layout = DocumentLayout.from_cu_seqlens(cu_seqlens, max_seqlen, input_ids.shape[0])

        if labels is not None:
            # Sparse prediction: the head and decoder only see the tokens that carry a label, and so
            # does the last layer past its attention.
            if labelled_index is None:
                labelled_index = (labels != IGNORE_INDEX).nonzero().squeeze(1)
            predicted = self.head(self.model(input_ids, layout, keep=labelled_index))
            targets = labels.index_select(0, labelled_index)
            if return_logits:
                logits = self.decoder(predicted)
                total = F.cross_entropy(logits.float(), targets, reduction="sum")
            else:
                logits = None
                total = linear_cross_entropy(predicted, self.decoder.weight, self.decoder.bias, targets)
            # The mean over labelled tokens, written so that a batch without any gives 0, not NaN.
            return MaskedLMOutput(loss=total / max(labelled_index.numel(), 1), logits=logits)

        logits = self.decoder(self.head(self.model(input_ids, layout)))
        if indices is not None:
            logits = repad(logits, indices, batch, seq_len)
        elif batch is not None:
            logits = logits.view(batch, seq_len, -1)
        return MaskedLMOutput(loss=None, logits=logits)


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """[B, S] -> flat ids [T], indices of the kept tokens (None when all are kept), cu_seqlens, max_seqlen."""
    batch, seq_len = input_ids.shape
    if attention_mask is None:
        cu_seqlens = torch.arange(0, batch * seq_len + 1, seq_len, dtype=torch.int32, device=input_ids.device)
        return input_ids.reshape(-1), None, cu_seqlens, seq_len
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    indices = attention_mask.reshape(-1).nonzero().squeeze(1)
    return input_ids.reshape(-1)[indices], indices, cu_seqlens, int(seqlens.max())


def repad(values: torch.Tensor, indices: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """[T, ...] back to [B, S, ...], zeros at padding."""
    out = values.new_zeros(batch * seq_len, *values.shape[1:]).index_copy(0, indices, values)
    return out.view(batch, seq_len, *values.shape[1:])
