"""The model on its own: packing, sparse prediction, output layouts, init, presets, config, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F

from modernbert_train.model import (
    ModelConfigError,
    ModernBertConfig,
    ModernBertForMaskedLM,
    flops_per_token,
    pad_vocab_size,
    training_flops,
)

VOCAB = 80


def tiny_model(**overrides) -> ModernBertForMaskedLM:
    torch.manual_seed(0)
    values = dict(vocab_size=VOCAB, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    config = ModernBertConfig.from_preset("tiny", **{**values, **overrides})
    model = ModernBertForMaskedLM(config).eval()
    with torch.no_grad():  # sharper attention than the init's, so that positions and windows matter
        for layer in model.model.layers:
            layer.attn.Wqkv.weight.mul_(10.0)
    return model


def test_packed_documents_equal_documents_run_alone():
    model = tiny_model(num_hidden_layers=4, global_attn_every_n_layers=2, local_attention=8)
    lengths = [5, 23, 12, 1]
    torch.manual_seed(1)
    docs = [torch.randint(4, VOCAB, (n,)) for n in lengths]
    cu_seqlens = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    with torch.no_grad():
        packed = model(input_ids=torch.cat(docs), cu_seqlens=cu_seqlens, max_seqlen=max(lengths)).logits
        alone = torch.cat([model(doc[None]).logits[0] for doc in docs])
    assert packed.shape == (sum(lengths), VOCAB)
    assert torch.allclose(packed, alone, atol=1e-5, rtol=1e-5)
    # Without max_seqlen the model works it out.
    with torch.no_grad():
        assert torch.equal(model(input_ids=torch.cat(docs), cu_seqlens=cu_seqlens).logits, packed)


def test_packed_rows_of_a_padded_batch_match_the_padded_batch():
    """The data pipeline's layout: several documents a row, rows right-padded, flattened to real tokens."""
    model = tiny_model(local_attention=6)
    torch.manual_seed(2)
    rows = [[7, 9, 4], [20], [3, 3, 3, 3]]
    width = max(sum(row) for row in rows)
    lengths = [n for row in rows for n in row]
    flat = torch.randint(4, VOCAB, (sum(lengths),))
    cu_seqlens = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    with torch.no_grad():
        packed = model(input_ids=flat, cu_seqlens=cu_seqlens).logits
        # Every document alone in its own padded row gives the same logits.
        padded = torch.zeros(len(lengths), width, dtype=torch.long)
        mask = torch.zeros_like(padded)
        for i, doc in enumerate(flat.split(lengths)):
            padded[i, : len(doc)], mask[i, : len(doc)] = doc, 1
        logits = model(padded, attention_mask=mask).logits
    assert logits.shape == (len(lengths), width, VOCAB)
    assert torch.allclose(logits[mask.bool()], packed, atol=1e-5, rtol=1e-5)
    assert torch.all(logits[~mask.bool()] == 0)


def test_documents_do_not_attend_across_boundaries():
    model = tiny_model(global_attn_every_n_layers=1)
    ids = torch.randint(4, VOCAB, (30,))
    cu_seqlens = torch.tensor([0, 10, 30], dtype=torch.int32)
    changed = ids.clone()
    changed[15] = (ids[15] + 1) % VOCAB  # inside the second document
    with torch.no_grad():
        before = model(input_ids=ids, cu_seqlens=cu_seqlens).logits
        after = model(input_ids=changed, cu_seqlens=cu_seqlens).logits
    assert torch.equal(before[:10], after[:10])
    assert not torch.allclose(before[10:], after[10:])


def test_local_layers_see_only_their_window():
    model = tiny_model(num_hidden_layers=2, global_attn_every_n_layers=2, local_attention=8)
    model.model.layers = model.model.layers[1:]  # keep the local layer only
    ids = torch.randint(4, VOCAB, (1, 32))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids).logits[0], model(changed).logits[0]
    moved = (before - after).abs().amax(dim=-1) > 0
    # Token 0 reaches tokens 0..4 (local_attention // 2 = 4 each side) and no further.
    assert moved[:5].all() and not moved[5:].any()


def test_sparse_prediction_returns_labelled_logits_and_the_dense_loss():
    model = tiny_model()
    torch.manual_seed(3)
    ids = torch.randint(4, VOCAB, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    labels[mask == 0] = -100
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        sparse = model(ids, attention_mask=mask, labels=labels)
    labelled = labels != -100
    assert sparse.logits.shape == (int(labelled.sum()), VOCAB)
    assert torch.allclose(sparse.logits, dense[labelled], atol=1e-6)
    expected = F.cross_entropy(dense.view(-1, VOCAB), labels.view(-1), ignore_index=-100)
    assert torch.allclose(sparse.loss, expected, atol=1e-6)
    nothing = model(ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    assert nothing.logits.shape == (0, VOCAB) and nothing.loss.item() == 0.0


def test_training_step_reduces_the_loss_with_dropout():
    model = tiny_model(attention_dropout=0.1, mlp_dropout=0.1, embedding_dropout=0.1).train()
    ids = torch.randint(4, VOCAB, (4, 24))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_init_statistics():
    config = ModernBertConfig.from_preset(
        "mini", vocab_size=512, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3,
        attention_bias=True, norm_bias=True,
    )  # fmt: skip
    model = ModernBertForMaskedLM(config)
    layer = model.model.layers[2]
    # A normal truncated at 2 std has std 0.88 * std.
    assert layer.attn.Wqkv.weight.std().item() == pytest.approx(0.02 * 0.88, rel=0.05)
    out_std = 0.02 / math.sqrt(2 * config.num_hidden_layers)
    assert layer.attn.Wo.weight.std().item() == pytest.approx(out_std * 0.88, rel=0.05)
    assert layer.mlp.Wo.weight.std().item() == pytest.approx(out_std * 0.88, rel=0.05)
    assert layer.attn.Wqkv.weight.abs().max().item() <= 2 * 0.02
    assert torch.all(layer.attn_norm.weight == 1) and torch.all(layer.attn_norm.bias == 0)
    assert torch.all(layer.attn.Wqkv.bias == 0) and torch.all(model.decoder.bias == 0)
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    assert isinstance(model.model.layers[0].attn_norm, torch.nn.Identity)


# transformers' ModernBertForMaskedLM counts for ModernBERT-base and -large (tied decoder counted once).
@pytest.mark.parametrize(("preset", "expected"), [("base", 149_655_232), ("large", 395_881_664)])
def test_preset_parameter_counts(preset, expected):
    with torch.device("meta"):
        model = ModernBertForMaskedLM(ModernBertConfig.from_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_config_round_trip_and_presets():
    config = ModernBertConfig.from_preset("mini", local_rope_theta=None, attn_backend="sdpa")
    assert ModernBertConfig.from_dict(config.to_dict()) == config
    assert (config.num_hidden_layers, config.hidden_size, config.local_rope_theta) == (6, 256, None)
    assert [config.is_global_layer(i) for i in range(4)] == [True, False, False, True]
    assert pad_vocab_size(50280) == 50304 and pad_vocab_size(64) == 64


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            dict(hidden_size=100, num_attention_heads=3),
            "hidden_size=100 is not divisible by num_attention_heads=3",
        ),
        (dict(hidden_size=96, num_attention_heads=32), "num_attention_heads=32 gives an odd head dimension"),
        (dict(attn_backend="xformers"), "attn_backend='xformers' is not one of"),
        (dict(vocab_size=100), "pad_token_id=50283 must be a token id in \\[0, vocab_size=100\\)"),
        (dict(num_hidden_layers=0), "num_hidden_layers=0 must be a positive integer"),
        (dict(attention_dropout=1.5), "attention_dropout=1.5 must be in"),
        (dict(hidden_activation="swish"), "hidden_activation='swish' is not one of"),
        (dict(hidden_size="768"), "hidden_size='768' must be a positive integer"),
        (dict(initializer_cutoff_factor=None), "initializer_cutoff_factor=None must be a positive number"),
        (dict(norm_eps=0.0), "norm_eps=0.0 must be a positive number"),
    ],
)
def test_config_errors_name_the_field(values, message):
    with pytest.raises(ModelConfigError, match=f"^model config: {message}"):
        ModernBertConfig(**values)


def test_config_rejects_unknown_keys_and_presets():
    with pytest.raises(ModelConfigError, match="unknown key 'hidden'"):
        ModernBertConfig.from_dict({"hidden": 3})
    with pytest.raises(ModelConfigError, match="unknown preset 'huge'"):
        ModernBertConfig.from_preset("huge")


def test_input_shape_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="input_ids must be \\[batch, seq\\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be flat"):
        model(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    # Documents of 30 and 20 tokens given max_seqlen=20 were mixed up in attention, without a word.
    with pytest.raises(ValueError, match=r"max_seqlen=20 is below the longest document \(30 tokens\)"):
        model(torch.ones(50, dtype=torch.long), cu_seqlens=torch.tensor([0, 30, 50]).int(), max_seqlen=20)


def test_flops_per_token_counts_the_head_for_labelled_tokens_only():
    config = ModernBertConfig.from_preset("base")
    encoder_weights = 22 * (4 * 768 * 768 + 3 * 768 * 1152)
    head_weights = 768 * 768 + 768 * 50368
    # Sequences within the window: every layer attends to all of them.
    assert flops_per_token(config, 64, labelled_fraction=1.0) == (
        6 * (encoder_weights + head_weights) + 12 * 768 * 64 * 22
    )
    # Longer ones: the 14 local layers attend to 129 tokens; 30% of the tokens reach the head.
    encoder = 6 * encoder_weights + 12 * 768 * (8 * 1024 + 14 * 129)
    assert flops_per_token(config, 1024) == pytest.approx(encoder + 0.3 * 6 * head_weights)
    assert flops_per_token(config, 1024) / 1e9 == pytest.approx(0.8246, abs=1e-4)
    # A batch: every real token through the encoder, the labelled ones through the head.
    assert training_flops(config, 1024, tokens=1000, labelled_tokens=300) == pytest.approx(
        1000 * flops_per_token(config, 1024)
    )
    assert training_flops(config, 1024, tokens=1000, labelled_tokens=0) == pytest.approx(1000 * encoder)


def test_last_layer_goes_on_with_the_labelled_tokens_only():
    """With labels, the last layer past its attention runs for the labelled tokens alone (`keep`): the
    same final states for them, and the same loss and gradients as running every token to the end."""
    from modernbert_train.model.attention import DocumentLayout

    model = tiny_model(num_hidden_layers=4, global_attn_every_n_layers=2, local_attention=8).train()
    torch.manual_seed(4)
    ids = torch.randint(4, VOCAB, (40,))
    labels = torch.where(torch.rand(40) < 0.3, ids, -100)
    cu_seqlens = torch.tensor([0, 9, 31, 40], dtype=torch.int32)
    layout = DocumentLayout.from_cu_seqlens(cu_seqlens, 22, 40)
    keep = (labels != -100).nonzero().squeeze(1)
    full = model.model(ids, layout)
    assert torch.allclose(model.model(ids, layout, keep=keep), full[keep], atol=1e-6)
    everything = F.cross_entropy(model.decoder(model.head(full[keep])), labels[keep])
    kept = model(input_ids=ids, cu_seqlens=cu_seqlens, labels=labels).loss
    torch.testing.assert_close(kept, everything, rtol=1e-6, atol=1e-6)
    params = list(model.parameters())
    for got, expected in zip(torch.autograd.grad(kept, params), torch.autograd.grad(everything, params)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
