"""The token ids the data pipeline needs, taken as arguments (data_prep reads them from tokenizer.json)."""

import hashlib
import json
from dataclasses import dataclass

# What the identity covers, for messages; the rule's number is recorded beside an identity (shard records made
# under rule 1, which hashed the model and added tokens only, are not compared by it).
IDENTITY_PARTS = "vocabulary, merges, added tokens, normalizer, pre-tokenizer or post-processor"
IDENTITY_RULE = 2


def tokenizer_identity(text: str) -> str:
    """A hash of what decides a tokenizer.json's ids, not of its formatting: the model (vocabulary and
    merges), the added tokens with their matching flags, and the normalizer, pre-tokenizer and
    post-processor (a lowercasing normalizer alone changes the ids). The decoder, truncation and padding
    settings are left out. `modernbert-data shard` records it in modernbert_data.json; training compares
    it."""
    tokenizer = json.loads(text)
    added = sorted(
        (token.get("id"), json.dumps(token, sort_keys=True)) for token in tokenizer.get("added_tokens") or []
    )
    essential = {
        "model": tokenizer.get("model"),
        "added_tokens": added,
        **{part: tokenizer.get(part) for part in ("normalizer", "pre_tokenizer", "post_processor")},
    }
    return hashlib.sha256(json.dumps(essential, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TokenizerInfo:
    """Special token ids and vocabulary size of the tokenizer the shards were written with.

    `special_ids` lists every id that must never be masked or drawn as a random replacement;
    pad/cls/sep/mask are always included.
    """

    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...] = ()

    def __post_init__(self):
        ids = {"pad_id": self.pad_id, "cls_id": self.cls_id, "sep_id": self.sep_id, "mask_id": self.mask_id}
        for name, value in ids.items():
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"tokenizer {name}={value} is outside the vocabulary [0, {self.vocab_size})")
        specials = tuple(sorted(set(self.special_ids) | set(ids.values())))
        if specials[0] < 0 or specials[-1] >= self.vocab_size:
            raise ValueError(f"tokenizer special_ids {specials} fall outside [0, {self.vocab_size})")
        object.__setattr__(self, "special_ids", specials)
