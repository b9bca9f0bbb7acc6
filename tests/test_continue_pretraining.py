"""Continued pretraining as a user does it: a released transformers ModernBERT folder -> `model.init_from_hf`
-> a few batches -> export -> transformers again (AutoModelForMaskedLM, AutoTokenizer, fill-mask).

The released folder is built as releases are: the special tokens at the end of the tokenizer, the
vocabulary padded past the tokenizer to a multiple of 64 (rows that must survive), a decoder bias, bf16
weights, and tokenizer_config.json naming the roles."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import REPO, _documents, run_train
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from modernbert_train.hf import HFCheckpointError, check_data_tokenizer, from_hf, to_hf
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
# What a tokenizer's save_pretrained writes (transformers 5 writes no special_tokens_map.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def release_tokenizer(texts: list[str]) -> Tokenizer:
    """A byte-level BPE with ModernBERT's special tokens after the learned vocabulary (ids 300-304)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False, lstrip=token == "[MASK]") for token in SPECIALS]
    )
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tokenizer


def save_release_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    roles = dict(
        zip(("unk_token", "cls_token", "sep_token", "pad_token", "mask_token"), SPECIALS, strict=True)
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=8192, **roles
    ).save_pretrained(folder)


def released_model(folder: Path, texts: list[str]) -> transformers.ModernBertForMaskedLM:
    tokenizer = release_tokenizer(texts)
    save_release_tokenizer(tokenizer, folder)
    size = tokenizer.get_vocab_size()
    ids = {role: tokenizer.token_to_id(f"[{role.upper()}]") for role in ("cls", "sep", "pad")}
    config = transformers.ModernBertConfig(
        vocab_size=-(-size // 64) * 64,  # 320: 15 rows past the tokenizer
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=2,
        global_attn_every_n_layers=3,
        local_attention=16,
        pad_token_id=ids["pad"],
        cls_token_id=ids["cls"],
        sep_token_id=ids["sep"],
        bos_token_id=ids["cls"],
        eos_token_id=ids["sep"],
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        sparse_prediction=True,
        classifier_pooling="mean",
    )
    torch.manual_seed(0)
    model = transformers.ModernBertForMaskedLM(config)
    with torch.no_grad():  # what training leaves: biases and norms off their initial values
        for name, parameter in model.named_parameters():
            if "norm" in name or "bias" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
        model.model.embeddings.tok_embeddings.weight[size:].normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(folder)
    return model


def hf_logits(model, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, batch["attention_mask"].bool()


TEXTS = ["The cat sees a red ball in the morning. " * 3, "My sister feeds the [MASK] every day.", "A dog."]


@pytest.mark.slow
def test_a_release_continues_and_comes_back_to_transformers(tmp_path, write_recipe):
    """Weights exact at step 0 (bf16 into an fp32 run, padded vocabulary rows, decoder bias), shards that
    record the release's special ids, and an export transformers loads with our logits and fills masks."""
    from modernbert_train.train.config import load_config
    from modernbert_train.train.run import build_run

    texts = _documents(200, 0)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    release = tmp_path / "released"
    released_model(release, texts)
    assert json.loads((release / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    data = tmp_path / "data"
    shard = [sys.executable, "-m", "data_prep.cli", "shard", "--input", str(tmp_path / "corpus.jsonl"),
             "--output", str(data), "--tokenizer", str(release), "--workers", "1"]  # fmt: skip
    subprocess.run(shard, check=True, cwd=REPO, capture_output=True)
    recorded = json.loads((data / "modernbert_data.json").read_text())["tokenizer"]
    released_config = json.loads((release / "config.json").read_text())
    for role in ("cls", "sep", "pad"):
        assert recorded[f"{role}_token_id"] == released_config[f"{role}_token_id"]
    assert recorded["mask_token_id"] == 304

    theirs = transformers.AutoModelForMaskedLM.from_pretrained(release, torch_dtype=torch.float32).eval()
    recipe = write_recipe(
        max_duration="3ba",
        model={"init_from_hf": str(release)},
        data={"train": [{"local": str(data)}], "eval": [{"local": str(data)}]},
        export={"hf_dir": str(tmp_path / "hf")},
    )
    run = build_run(load_config(recipe))
    ours = run.model.model.eval()
    assert ours.config.vocab_size == 320 and ours.config.mask_token_id == 304
    their_weights = theirs.state_dict()
    for name, value in ours.state_dict().items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, their_weights[name]), name
    assert ours.decoder.bias.abs().sum() > 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(release)
    (logits, mask), (expected, _) = hf_logits(ours, tokenizer, TEXTS), hf_logits(theirs, tokenizer, TEXTS)
    torch.testing.assert_close(logits[mask], expected[mask], rtol=0, atol=1e-4)
    run.trainer.close()

    run_train(recipe)
    exported = tmp_path / "hf"
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        assert (exported / name).is_file(), name
    from modernbert_train.train.checkpoint import model_weights, read_checkpoint

    trained = ModernBertForMaskedLM(ours.config)
    trained.load_state_dict(model_weights(read_checkpoint(tmp_path / "run" / "latest-rank0.pt")))
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(exported).eval()
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert exported_tokenizer.mask_token_id == 304 and exported_tokenizer.pad_token_id == 303
    (logits, mask), (expected, _) = (
        hf_logits(trained.eval(), exported_tokenizer, TEXTS),
        hf_logits(reloaded, exported_tokenizer, TEXTS),
    )
    torch.testing.assert_close(logits[mask], expected[mask], rtol=0, atol=1e-4)
    assert not torch.equal(reloaded.decoder.bias, theirs.decoder.bias)  # it trained from the release
    fill = transformers.pipeline("fill-mask", model=str(exported), tokenizer=str(exported))
    assert len(fill("The cat sees a red [MASK] in the morning.", top_k=3)) == 3


def test_sharded_safetensors_load_as_one_file(tmp_path):
    texts = _documents(60, 0)
    release = tmp_path / "released"
    model = released_model(release, texts)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    for name in (*TOKENIZER_FILES, "special_tokens_map.json"):
        if not (release / name).is_file():
            continue
        (tmp_path / "sharded" / name).write_bytes((release / name).read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = from_hf(tmp_path / "sharded").state_dict()
    for name, value in from_hf(release).state_dict().items():
        assert torch.equal(ours[name], value), name


def test_another_tokenizer_with_the_same_ids_is_refused(tmp_path):
    """Two tokenizers trained alike share their special ids and size but not their ids for text: the data
    must be sharded with the checkpoint's own (a copy saved by another tokenizers version is that)."""
    texts = _documents(60, 0)
    release = tmp_path / "released"
    release.mkdir()
    save_release_tokenizer(release_tokenizer(texts), release)
    other = tmp_path / "other.json"
    release_tokenizer([text.upper() for text in texts]).save(str(other))
    assert Tokenizer.from_file(str(other)).token_to_id("[MASK]") == 304
    with pytest.raises(HFCheckpointError) as error:
        check_data_tokenizer(release, other)
    message = str(error.value)
    assert "\n" not in message and str(release / "tokenizer.json") in message and str(other) in message
    # The same tokenizer, its merges written in the older "a b" form and indented: accepted.
    same = json.loads((release / "tokenizer.json").read_text())
    same["model"]["merges"] = [" ".join(pair) for pair in same["model"]["merges"]]
    (tmp_path / "same.json").write_text(json.dumps(same, indent=4))
    check_data_tokenizer(release, tmp_path / "same.json")
    check_data_tokenizer(tmp_path / "no-tokenizer-here", other)  # a folder without one: nothing to compare
    # Domain tokens added after the release's ids (into the padded vocabulary's spare rows): accepted; one
    # added among them, or a token of theirs taken away, is another tokenizer.
    extended = Tokenizer.from_file(str(release / "tokenizer.json"))
    extended.add_tokens(["<gene>", "<protein>"])
    assert extended.token_to_id("<protein>") == 306
    extended.save(str(tmp_path / "extended.json"))
    check_data_tokenizer(release, tmp_path / "extended.json")
    fewer = json.loads((release / "tokenizer.json").read_text())
    fewer["added_tokens"] = fewer["added_tokens"][:-1]
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    with pytest.raises(HFCheckpointError, match="nor extended by added tokens after its ids"):
        check_data_tokenizer(release, tmp_path / "fewer.json")


def test_a_refused_tokenizer_leaves_nothing_behind(tmp_path):
    """to_hf checks the tokenizer before it writes: a refused one left config.json and the weights behind,
    a folder that looks like a finished export."""
    tokenizer = release_tokenizer(_documents(60, 0))  # 305 tokens, [PAD] 303
    small = ModernBertConfig.from_preset("tiny", vocab_size=128, pad_token_id=3, cls_token_id=1,
                                         sep_token_id=2, mask_token_id=4)  # fmt: skip
    with pytest.raises(HFCheckpointError, match="its 305 tokens do not fit"):
        to_hf(ModernBertForMaskedLM(small), tmp_path / "out", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_tokenizer_with_other_special_ids_is_refused(tmp_path):
    """A raw tokenizer whose [PAD] is 303, under a config whose pad_token_id is 3: the export named the
    byte token at id 3 the pad token."""
    config = ModernBertConfig.from_preset("tiny", vocab_size=320, pad_token_id=3, cls_token_id=301,
                                          sep_token_id=302, mask_token_id=304)  # fmt: skip
    tokenizer = release_tokenizer(_documents(60, 0))
    with pytest.raises(
        HFCheckpointError, match=r"its \[PAD\] is id 303, but the model config's pad_token_id=3"
    ):
        to_hf(ModernBertForMaskedLM(config), tmp_path / "out", tokenizer=tokenizer)
    good = ModernBertConfig.from_preset("tiny", vocab_size=320, pad_token_id=303, cls_token_id=301,
                                        sep_token_id=302, mask_token_id=304)  # fmt: skip
    to_hf(ModernBertForMaskedLM(good), tmp_path / "good", tokenizer=tokenizer)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "good").pad_token == "[PAD]"


def test_config_errors_name_the_folder(tmp_path):
    folder = tmp_path / "bert"
    transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )  # fmt: skip
    ).save_pretrained(folder)
    with pytest.raises(HFCheckpointError) as error:
        from_hf(folder)
    assert str(error.value).startswith(f"{folder / 'config.json'}: model_type is 'bert'")


@pytest.mark.slow
def test_data_sharded_with_another_tokenizer_of_the_same_ids_is_refused(tmp_path, write_recipe, capsys):
    """Special ids and vocabulary size agree, the tokenizers do not: the run started, training the
    release's embeddings on other tokens' ids, and exported the data's tokenizer with them."""
    from modernbert_train.train.main import main

    texts = _documents(200, 0)
    released_model(tmp_path / "released", texts)
    other = tmp_path / "other"
    other.mkdir()
    save_release_tokenizer(release_tokenizer([text.upper() for text in texts]), other)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    shard = [sys.executable, "-m", "data_prep.cli", "shard", "--input", str(tmp_path / "corpus.jsonl"),
             "--output", str(tmp_path / "data"), "--tokenizer", str(other), "--workers", "1"]  # fmt: skip
    subprocess.run(shard, check=True, cwd=REPO, capture_output=True)
    recipe = write_recipe(
        max_duration="2ba",
        model={"init_from_hf": str(tmp_path / "released")},
        data={"train": [{"local": str(tmp_path / "data")}], "eval": [{"local": str(tmp_path / "data")}]},
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(recipe)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.init_from_hf" in err and "is not the tokenizer the data was sharded with" in err
