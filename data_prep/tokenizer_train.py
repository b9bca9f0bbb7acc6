"""Train a byte-level BPE tokenizer with ModernBERT's special tokens, saved for HF `AutoTokenizer`.

Layout: `[UNK] [CLS] [SEP] [PAD] [MASK]` take ids 0-4, then the 256 byte tokens and the learned merges;
`[unused0]`, `[unused1]`, ... fill the vocabulary up to a multiple of 64 (tensor-core friendly embedding
rows). The post-processor wraps text as `[CLS] ... [SEP]` for HF use; sharding encodes without it.
"""

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from data_prep.errors import UsageError
from data_prep.output_dir import staged_output

SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "mask_token": "[MASK]",
}
VOCAB_MULTIPLE = 64
MIN_VOCAB_SIZE = 320  # the 5 special tokens and 256 bytes, rounded up to a multiple of 64
MODEL_MAX_LENGTH = 8192


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE or vocab_size % VOCAB_MULTIPLE:
        raise UsageError(
            f"--vocab-size {vocab_size}: must be a multiple of {VOCAB_MULTIPLE} and at least {MIN_VOCAB_SIZE}"
        )


def _special_added_tokens() -> list[AddedToken]:
    # [MASK] swallows the space before it, as in ModernBERT, so "the [MASK]." fills in a word.
    return [
        AddedToken(token, special=True, normalized=False, lstrip=token == "[MASK]")
        for token in SPECIAL_TOKENS.values()
    ]


def build_tokenizer(texts: Iterable[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=_special_added_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # A small corpus can end below vocab_size; pad to the next multiple of 64 either way.
    unused = -tokenizer.get_vocab_size() % VOCAB_MULTIPLE
    tokenizer.add_special_tokens(
        [AddedToken(f"[unused{i}]", special=True, normalized=False) for i in range(unused)]
    )
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """tokenizer.json plus the two small files `transformers.AutoTokenizer` reads the roles from."""
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIAL_TOKENS,
        "model_max_length": MODEL_MAX_LENGTH,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")


def train_tokenizer(
    texts: Iterable[str], output: Path, vocab_size: int, *, overwrite: bool = False
) -> Tokenizer:
    """Train on `texts` and write the tokenizer folder `output` atomically; without a single text nothing
    is written (a tokenizer of bytes alone, no merges, would pass for a trained one)."""
    check_vocab_size(vocab_size)
    counted = [0]

    def counting(texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            counted[0] += 1
            yield text

    with staged_output(output, overwrite) as folder:
        tokenizer = build_tokenizer(counting(texts), vocab_size, progress=sys.stderr.isatty())
        if not counted[0]:  # raised here, the staging folder is removed
            raise UsageError(
                f"--output {output}: no documents to train on: no input record had text (see --text-field)"
            )
        save_tokenizer(tokenizer, folder)
    return tokenizer
