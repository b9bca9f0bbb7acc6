"""Our model against transformers' ModernBertForMaskedLM: same logits, loss and gradients; export/import."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForMaskedLM, AutoTokenizer
from transformers import ModernBertConfig as HFConfig
from transformers import ModernBertForMaskedLM as HFModel

from modernbert_train.hf import (
    HFCheckpointError,
    config_from_hf,
    config_to_hf,
    from_hf,
    read_hf_config,
    to_hf,
)
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
VOCAB = 96
TOKEN_IDS = dict(pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)

# Depth, width, heads, global every n, window, thetas, biases: windows below the sequence length so
# locality matters, several global/local alternations, distinct global and local thetas.
SHAPES = {
    "alternating-3": dict(num_hidden_layers=4, hidden_size=48, intermediate_size=80, num_attention_heads=3,
                          global_attn_every_n_layers=3, local_attention=8),
    "alternating-2": dict(num_hidden_layers=5, hidden_size=32, intermediate_size=40, num_attention_heads=2,
                          global_attn_every_n_layers=2, local_attention=12, global_rope_theta=500.0,
                          local_rope_theta=20.0),
    "all-global": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=48, num_attention_heads=4,
                       global_attn_every_n_layers=1),
    "biases": dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   global_attn_every_n_layers=2, local_attention=6, attention_bias=True, mlp_bias=True,
                   norm_bias=True, classifier_bias=True, local_rope_theta=None),
}  # fmt: skip


def hf_model(shape: str, attn_implementation: str = "sdpa") -> HFModel:
    """A transformers model with random weights; norms and biases perturbed so they are checked too, and
    sharper attention than the init's near-uniform one, so positions and windows move the logits."""
    config = ModernBertConfig(vocab_size=VOCAB, **TOKEN_IDS, **SHAPES[shape])
    torch.manual_seed(0)
    # The keys both transformers versions take as arguments, so save_pretrained writes its own dialect.
    fives = ("model_type", "rope_parameters", "layer_types")
    values = {k: v for k, v in config_to_hf(config).items() if k not in fives}
    model = HFModel(HFConfig(**values, attn_implementation=attn_implementation))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
            if name.endswith("Wqkv.weight"):
                param.mul_(10.0)
    return model.eval()


def padded_batch(seq_len: int = 40, lengths=(40, 27, 9, 33)):
    torch.manual_seed(1)
    input_ids = torch.randint(4, VOCAB, (len(lengths), seq_len))
    attention_mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids[:, 0] = TOKEN_IDS["cls_token_id"]
    input_ids[attention_mask == 0] = TOKEN_IDS["pad_token_id"]
    labels = torch.where(torch.rand(input_ids.shape) < 0.3, input_ids, -100)
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_from_hf_matches_transformers_and_round_trips(shape, tmp_path):
    theirs = hf_model(shape, "eager" if shape == "all-global" else "sdpa")
    theirs.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf").eval()

    input_ids, attention_mask, labels = padded_batch()
    real = attention_mask.bool()
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, attention_mask=attention_mask).logits
        got = ours(input_ids, attention_mask=attention_mask).logits
        assert got.shape == expected.shape
        assert relative_error(got[real], expected[real]) < 1e-4
        assert torch.all(got[~real] == 0)
        # Unpadded batches take the index-free path: check it against transformers too.
        full = theirs(input_ids=input_ids[:, :9]).logits
        assert relative_error(ours(input_ids[:, :9]).logits, full) < 1e-4

    to_hf(ours, tmp_path / "back")
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "back", attn_implementation="sdpa").eval()
    with torch.no_grad():
        again = reloaded(input_ids=input_ids, attention_mask=attention_mask).logits
        original = theirs.to(torch.float32)(input_ids=input_ids, attention_mask=attention_mask).logits
    if shape != "all-global":  # same attention implementation: bit-identical
        assert torch.equal(again, original)
    assert relative_error(again[real], original[real]) < 1e-5


@pytest.mark.parametrize("shape", ["alternating-2", "biases"])
def test_packed_documents_match_transformers_one_by_one(shape, tmp_path):
    theirs = hf_model(shape)
    theirs.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    input_ids, attention_mask, _ = padded_batch()
    real = attention_mask.bool()
    lengths = attention_mask.sum(1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).int()
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, attention_mask=attention_mask).logits[real]
        packed = ours(input_ids=input_ids[real], cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max())).logits
    assert relative_error(packed, expected) < 1e-4


@pytest.mark.parametrize("shape", ["alternating-2", "biases"])
def test_loss_and_gradients_match_transformers(shape, tmp_path):
    theirs = hf_model(shape)
    theirs.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    input_ids, attention_mask, labels = padded_batch()

    expected = theirs(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    got = ours(input_ids, attention_mask=attention_mask, labels=labels)
    assert got.logits.shape == (int((labels != -100).sum()), VOCAB)
    assert abs(got.loss.item() - expected.loss.item()) < 1e-5 * expected.loss.item()
    expected.loss.backward()
    got.loss.backward()

    their_grads = dict(theirs.named_parameters())
    our_params = dict(ours.named_parameters())
    assert set(our_params) == set(their_grads)
    for name, param in our_params.items():
        assert relative_error(param.grad, their_grads[name].grad) < 1e-4, name


def test_to_hf_writes_tied_weights_and_token_ids(tmp_path):
    config = ModernBertConfig.from_preset("tiny", vocab_size=VOCAB, **TOKEN_IDS)
    model = ModernBertForMaskedLM(config)
    to_hf(model, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert "decoder.weight" not in weights
    assert torch.equal(weights["model.embeddings.tok_embeddings.weight"], model.decoder.weight)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "modernbert"
    assert written["architectures"] == ["ModernBertForMaskedLM"]
    assert {key: written[key] for key in TOKEN_IDS} == TOKEN_IDS
    assert config_from_hf(written) == config
    # As every other file (safetensors 0.8 writes 0600 through a temporary file): others can load it.
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    # transformers ties the decoder to the embeddings on load: an untied one is refused, never replaced.
    model.decoder.weight = torch.nn.Parameter(model.decoder.weight.detach() + 1)
    with pytest.raises(ValueError, match="decoder.weight is not tied to model.embeddings.tok_embeddings"):
        to_hf(model, tmp_path / "untied")


def test_to_hf_writes_both_dialects_with_the_local_theta_resolved(tmp_path):
    config = ModernBertConfig.from_preset(
        "tiny", vocab_size=VOCAB, **TOKEN_IDS, global_rope_theta=500.0, local_rope_theta=None
    )
    written = config_to_hf(config)
    # transformers 5 would take a null local theta as the value itself.
    assert written["local_rope_theta"] == written["global_rope_theta"] == 500.0
    assert written["rope_parameters"] == {
        "full_attention": {"rope_type": "default", "rope_theta": 500.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
    }
    assert written["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    loaded = HFConfig.from_dict(written)
    if TRANSFORMERS_5:
        assert loaded.rope_parameters["sliding_attention"]["rope_theta"] == 500.0
    else:
        assert (loaded.global_rope_theta, loaded.local_rope_theta) == (500.0, 500.0)


# One model in each config.json dialect: transformers 4's keys, and transformers 5's.
LEGACY_KEYS = dict(global_rope_theta=500.0, local_rope_theta=20.0, global_attn_every_n_layers=2)
FIVE_KEYS = dict(
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 500.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 20.0},
    },
    layer_types=["full_attention", "sliding_attention"] * 2 + ["full_attention"],
)


def hand_written(tmp_path, keys: dict):
    """A folder holding the alternating-2 weights under a config.json written by hand with `keys` for the
    RoPE thetas and the layer layout."""
    folder = tmp_path / "hand"
    hf_model("alternating-2").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("global_rope_theta", "local_rope_theta", "global_attn_every_n_layers") + tuple(FIVE_KEYS):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps({**config, **keys}))
    return folder


@pytest.mark.parametrize("dialect", ["legacy", "transformers-5", "both"])
def test_from_hf_reads_each_config_dialect(dialect, tmp_path):
    keys = {"legacy": LEGACY_KEYS, "transformers-5": FIVE_KEYS, "both": {**LEGACY_KEYS, **FIVE_KEYS}}[dialect]
    folder = hand_written(tmp_path, keys)
    ours = from_hf(folder).eval()
    c = ours.config
    assert (c.global_rope_theta, c.local_rope_theta, c.global_attn_every_n_layers) == (500.0, 20.0, 2)
    input_ids, attention_mask, _ = padded_batch()
    real = attention_mask.bool()
    with torch.no_grad():
        got = ours(input_ids, attention_mask=attention_mask).logits[real]
        expected = hf_model("alternating-2")(input_ids=input_ids, attention_mask=attention_mask).logits[real]
    assert relative_error(got, expected) < 1e-4
    if TRANSFORMERS_5 or dialect != "transformers-5":  # transformers 4 reads only its own keys
        theirs = AutoModelForMaskedLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        with torch.no_grad():
            loaded = theirs(input_ids=input_ids, attention_mask=attention_mask).logits[real]
        assert relative_error(got, loaded) < 1e-4


def test_from_hf_reads_a_null_local_theta_as_the_global_one(tmp_path):
    folder = hand_written(tmp_path, {**LEGACY_KEYS, "local_rope_theta": None})
    assert from_hf(folder).config.local_rope_theta is None
    same = {**FIVE_KEYS["rope_parameters"]["full_attention"]}
    agreeing = {**LEGACY_KEYS, **FIVE_KEYS, "local_rope_theta": None}
    agreeing["rope_parameters"] = {"full_attention": same, "sliding_attention": same}
    assert from_hf(hand_written(tmp_path / "agreeing", agreeing)).config.local_rope_theta == 500.0


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({**FIVE_KEYS, "global_rope_theta": 400.0},
         "rope_parameters.full_attention.rope_theta=500.0 disagrees with global_rope_theta=400.0"),
        ({**FIVE_KEYS, "local_rope_theta": None},
         "rope_parameters.sliding_attention.rope_theta=20.0 disagrees with local_rope_theta=null"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}}},
         "rope_parameters.full_attention.rope_type='yarn' is unsupported"),
        ({"rope_parameters": {"sliding_attention": {"rope_theta": 1.0, "partial_rotary_factor": 0.5}}},
         "partial_rotary_factor=0.5 is unsupported"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1.0}},
         "rope_parameters=.* is unsupported"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling=.* is unsupported"),
        ({"layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention",
                          "sliding_attention"]}, "layer_types=.* is unsupported"),
        ({**FIVE_KEYS, "global_attn_every_n_layers": 3}, "disagrees with global_attn_every_n_layers=3"),
        ({"layer_types": ["full_attention"] * 2}, "layer_types has 2 entries but num_hidden_layers=5"),
    ],
)  # fmt: skip
def test_from_hf_refuses_configs_it_cannot_honour(keys, message, tmp_path):
    with pytest.raises(HFCheckpointError, match=message) as error:
        from_hf(hand_written(tmp_path, keys))
    assert "\n" not in str(error.value)


def tiny_tokenizer() -> Tokenizer:
    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[MASK]": 3, "[UNK]": 4, "hello": 5, "world": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


@pytest.mark.parametrize("form", ["object", "file", "folder", "transformers"])
def test_to_hf_tokenizer_loads_with_auto_tokenizer(form, tmp_path, capfd):
    tokenizer = tiny_tokenizer()
    (tmp_path / "tok").mkdir()
    tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))
    config = ModernBertConfig.from_preset("tiny", vocab_size=64, **TOKEN_IDS)
    if form == "transformers":  # a transformers tokenizer is saved as it is
        to_hf(ModernBertForMaskedLM(config), tmp_path / "first", tokenizer=tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "first")
    paths = {"file": tmp_path / "tok" / "tokenizer.json", "folder": tmp_path / "tok"}
    given = paths.get(form, tokenizer)
    capfd.readouterr()
    to_hf(ModernBertForMaskedLM(config), tmp_path / "out", tokenizer=given)
    # Exporting is quiet: transformers 5's save_pretrained would draw a progress bar on stderr.
    assert capfd.readouterr() == ("", "")

    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (loaded.cls_token, loaded.sep_token, loaded.pad_token, loaded.mask_token) == (
        "[CLS]", "[SEP]", "[PAD]", "[MASK]"
    )  # fmt: skip
    assert loaded.mask_token_id == 3
    assert loaded("hello world")["input_ids"] == [1, 5, 6, 2]
    assert "token_type_ids" not in loaded("hello")
    # from_hf finds the mask token in the exported folder.
    assert from_hf(tmp_path / "out").config.mask_token_id == 3


@pytest.mark.parametrize(
    "model, unk",
    [
        ("wordpiece-named", "<oov>"),  # the model's own unk_token, whatever its spelling
        ("unigram", "<u>"),  # Unigram names it by id
        ("bpe-roberta", "<unk>"),  # a BPE without unk_token: RoBERTa's spelling in the vocabulary
        ("bpe-none", None),  # byte-level BPE: nothing is unknown
    ],
)
def test_the_exported_tokenizer_keeps_the_unknown_token(model, unk, tmp_path):
    words = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    extra = {"wordpiece-named": ["<oov>"], "unigram": ["<u>"], "bpe-roberta": ["<unk>"], "bpe-none": []}
    vocab = {token: i for i, token in enumerate(words + extra[model])}
    if model == "wordpiece-named":
        tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="<oov>"))
    elif model == "unigram":
        tokenizer = Tokenizer(models.Unigram([(token, -1.0) for token in vocab], unk_id=len(vocab) - 1))
    else:
        tokenizer = Tokenizer(models.BPE(vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    config = ModernBertConfig.from_preset("tiny", vocab_size=64, **TOKEN_IDS)
    to_hf(ModernBertForMaskedLM(config), tmp_path / "out", tokenizer=tokenizer)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert loaded.unk_token == unk
    if unk is not None:
        assert loaded.unk_token_id == vocab[unk]


def test_to_hf_rejects_tokenizer_without_the_config_token(tmp_path):
    config = ModernBertConfig.from_preset("tiny", vocab_size=64, **{**TOKEN_IDS, "mask_token_id": 40})
    with pytest.raises(HFCheckpointError, match="mask_token_id=40"):
        to_hf(ModernBertForMaskedLM(config), tmp_path, tokenizer=tiny_tokenizer())


def test_to_hf_rejects_a_tokenizer_with_other_ids_or_more_tokens(tmp_path):
    """A transformers tokenizer is saved as it is, so its ids must be the config's; any tokenizer must fit
    the model's vocabulary."""
    config = ModernBertConfig.from_preset("tiny", vocab_size=64, **TOKEN_IDS)
    to_hf(ModernBertForMaskedLM(config), tmp_path / "first", tokenizer=tiny_tokenizer())
    loaded = AutoTokenizer.from_pretrained(tmp_path / "first")
    moved = ModernBertConfig.from_preset("tiny", vocab_size=64, **{**TOKEN_IDS, "mask_token_id": 5})
    with pytest.raises(HFCheckpointError, match="its mask_token_id is 3, the model config's 5"):
        to_hf(ModernBertForMaskedLM(moved), tmp_path / "second", tokenizer=loaded)
    small = ModernBertConfig.from_preset("tiny", vocab_size=6, **TOKEN_IDS)
    for given in (tiny_tokenizer(), loaded):
        with pytest.raises(HFCheckpointError, match="its 7 tokens do not fit the model's vocab_size=6"):
            to_hf(ModernBertForMaskedLM(small), tmp_path / "third", tokenizer=given)


def test_from_hf_without_a_mask_token_id_and_a_null_cutoff(tmp_path):
    """transformers' config.json has no mask_token_id: the tokenizer beside it says, else ModernBERT's own id
    where the vocabulary holds it. A null initializer_cutoff_factor is transformers' 3."""
    folder = exported(tmp_path)
    values = json.loads((folder / "config.json").read_text())
    del values["mask_token_id"]
    (folder / "config.json").write_text(json.dumps({**values, "initializer_cutoff_factor": None}))
    with pytest.raises(HFCheckpointError, match=r"no mask_token_id, and no tokenizer.json .* vocab_size=96"):
        from_hf(folder)
    (folder / "config.json").write_text(json.dumps({**values, "vocab_size": 50368}))
    assert read_hf_config(folder).mask_token_id == 50284
    values["initializer_cutoff_factor"] = None
    assert config_from_hf(values, mask_token_id=3).initializer_cutoff_factor == 3.0


def exported(tmp_path):
    config = ModernBertConfig.from_preset("tiny", vocab_size=VOCAB, **TOKEN_IDS)
    return to_hf(ModernBertForMaskedLM(config), tmp_path / "model")


def test_from_hf_rejects_other_model_types(tmp_path):
    folder = exported(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(HFCheckpointError, match="model_type is 'bert'"):
        from_hf(folder)


def test_from_hf_lists_missing_and_misshaped_weights(tmp_path):
    folder = exported(tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.Wi.weight"]
    weights["head.dense.weight"] = torch.zeros(3, 3)
    weights["pooler.weight"] = torch.zeros(2)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(HFCheckpointError) as error:
        from_hf(folder)
    message = str(error.value)
    assert "missing weights (1): model.layers.1.mlp.Wi.weight" in message
    assert "unexpected weights (1): pooler.weight" in message
    assert "head.dense.weight [3, 3] != [64, 64]" in message


def test_from_hf_refuses_pickles_and_bad_config(tmp_path):
    folder = exported(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(HFCheckpointError, match="only pytorch_model.bin"):
        from_hf(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(HFCheckpointError, match="not valid JSON"):
        from_hf(folder)
    with pytest.raises(HFCheckpointError, match="no config.json"):
        from_hf(tmp_path / "nowhere")
    with pytest.raises(HFCheckpointError, match="hidden_size"):
        config_from_hf({"model_type": "modernbert", "hidden_size": 30, "num_attention_heads": 4})


def test_a_damaged_model_folder_is_a_one_line_error(tmp_path):
    """Non-UTF-8 or malformed JSON, a truncated safetensors file: named in one line (fine-tuning and
    init_from_hf printed the library's traceback)."""

    def refused(match: str) -> None:
        with pytest.raises(HFCheckpointError, match=match) as error:
            from_hf(folder)
        assert "\n" not in str(error.value)

    folder = exported(tmp_path)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    refused(r"model.safetensors: cannot be read \(truncated or damaged\?\)")
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "tokenizer.json").write_bytes(b"\xff\xfe{")
    refused(r"tokenizer.json:1: not UTF-8 text \(byte 0xff\)")
    (folder / "tokenizer.json").write_text('{"added_tokens": [1, 2]}')
    refused(r"tokenizer.json: not a tokenizer.json")
    (folder / "tokenizer.json").unlink()
    (folder / "config.json").write_bytes(b"\x89PNG\r\n")
    refused(r"config.json:1: not UTF-8 text \(byte 0x89\)")
    (folder / "config.json").write_text("{not json")
    refused(r"config.json: not valid JSON")
    (folder / "config.json").write_text("[1, 2]")
    refused(r"config.json: not a model config")
