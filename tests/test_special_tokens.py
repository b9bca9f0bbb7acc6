"""Special tokens from one source: `shard` finds them (BERT or RoBERTa spellings, or named by flags), refuses
a tokenizer without one, and records their ids in modernbert_data.json; training and export use those ids."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_train
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from data_prep.cli import main

TEXTS = [
    "the cat sees a red ball in the morning. the old man feeds the small bird near the lake.",
    "our teacher paints the blue house with great care. a dog follows the farmer every day.",
] * 20


def write_roberta_tokenizer(folder: Path, mask: str | None = "<mask>") -> Path:
    """A byte-level BPE spelled as RoBERTa's: <s>=0 <pad>=1 </s>=2 <unk>=3, the mask token last."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TEXTS, trainer)
    if mask:
        tokenizer.add_special_tokens([AddedToken(mask, special=True, lstrip=True, normalized=False)])
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def shard(tmp_path: Path, capsys, tokenizer: Path, *flags: str) -> tuple[int, str]:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    argv = [
        "shard",
        "--input",
        corpus,
        "--output",
        tmp_path / "shards",
        "--tokenizer",
        tokenizer,
        "--workers",
        "1",
    ]
    code = main([str(arg) for arg in (*argv, *flags)])
    return code, capsys.readouterr().err


def recorded(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "shards" / "modernbert_data.json").read_text())["tokenizer"]


def test_roberta_spellings_are_recorded(tmp_path, capsys):
    tokenizer = write_roberta_tokenizer(tmp_path / "roberta")
    code, err = shard(tmp_path, capsys, tokenizer)
    assert code == 0, err
    ids = recorded(tmp_path)
    mask_id = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).token_to_id("<mask>")
    assert (ids["cls_token_id"], ids["pad_token_id"], ids["sep_token_id"], ids["unk_token_id"]) == (
        0,
        1,
        2,
        3,
    )
    assert ids["mask_token_id"] == mask_id == ids["vocab_size"] - 1


def test_a_tokenizer_without_a_mask_token_is_refused_naming_the_flag(tmp_path, capsys):
    code, err = shard(tmp_path, capsys, write_roberta_tokenizer(tmp_path / "nomask", mask=None))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "no mask token" in err and "--mask-token TOKEN" in err
    assert not (tmp_path / "shards").exists()


def test_a_configured_token_the_tokenizer_lacks_is_named(tmp_path, capsys):
    tokenizer = write_roberta_tokenizer(tmp_path / "configured")
    config = tokenizer / "tokenizer_config.json"
    config.write_text(json.dumps({"mask_token": {"content": "[MASK]"}}))  # the vocabulary has <mask>
    code, err = shard(tmp_path, capsys, tokenizer)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{config} names mask_token '[MASK]', which tokenizer.json does not have" in err
    assert "--mask-token TOKEN" in err and not (tmp_path / "shards").exists()


def test_a_damaged_tokenizer_config_or_a_non_utf8_tokenizer_is_named(tmp_path, capsys):
    """Were blamed on tokenizer.json, and a bare UnicodeDecodeError (exit 1)."""
    tokenizer = write_roberta_tokenizer(tmp_path / "damaged")
    config = tokenizer / "tokenizer_config.json"
    config.write_text('{"mask_token": ')
    code, err = shard(tmp_path, capsys, tokenizer)
    assert code == 2 and f"{config}: not a tokenizer_config.json (not JSON:" in err
    config.unlink()
    (tokenizer / "tokenizer.json").write_bytes(b"\xff\xfe{}")
    code, err = shard(tmp_path, capsys, tokenizer)
    assert code == 2 and f"{tokenizer / 'tokenizer.json'}:1: not UTF-8 text (byte 0xff)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "shards").exists()


def test_flags_name_special_tokens_spelled_otherwise(tmp_path, capsys):
    tokenizer = write_roberta_tokenizer(tmp_path / "custom", mask="[[hole]]")
    code, err = shard(tmp_path, capsys, tokenizer, "--mask-token", "<nope>")
    assert code == 2 and "--mask-token <nope>:" in err and "has no such token" in err
    code, err = shard(tmp_path, capsys, tokenizer, "--mask-token", "[[hole]]", "--pad-token", "<unk>")
    assert code == 0, err
    ids, vocab = recorded(tmp_path), Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    assert ids["mask_token_id"] == vocab.token_to_id("[[hole]]") and ids["pad_token_id"] == 3


@pytest.mark.slow
def test_a_roberta_tokenizer_goes_from_shard_through_training_to_export(tmp_path, write_recipe):
    tokenizer = write_roberta_tokenizer(tmp_path / "roberta")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    subprocess.run(
        [sys.executable, "-m", "data_prep.cli", "shard", "--input", str(corpus), "--output",
         str(tmp_path / "shards"), "--tokenizer", str(tokenizer), "--workers", "1"],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    ids = recorded(tmp_path)
    recipe = write_recipe(
        max_duration="2ba",
        save_interval="2ba",
        data={"train": [{"local": str(tmp_path / "shards")}], "eval": []},
        export={"hf_dir": str(tmp_path / "hf")},
    )
    run_train(recipe)

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["pad_token_id"], config["cls_token_id"], config["sep_token_id"]) == (1, 0, 2)
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported.mask_token == "<mask>" and exported.mask_token_id == ids["mask_token_id"]
    assert (exported.pad_token, exported.cls_token, exported.sep_token) == ("<pad>", "<s>", "</s>")
    assert (exported.unk_token, exported.unk_token_id) == ("<unk>", 3)
    assert exported("the cat")["input_ids"][0] == 0  # wrapped as <s> ... </s>
