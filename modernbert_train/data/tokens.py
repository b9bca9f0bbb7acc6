"""The token ids the data pipeline needs, taken as arguments (data_prep reads them from tokenizer.json)."""

import hashlib
import json
from dataclasses import dataclass


def tokenizer_identity(text: str) -> str:
    """A hash of what decides a tokenizer.json's ids (model: vocabulary and merges; added tokens), not of its
    formatting. `modernbert-data shard` records it in modernbert_data.json; training compares it."""
    tokenizer = json.loads(text)
    added = sorted((token["id"], token["content"]) for token in tokenizer.get("added_tokens") or [])
    essential = {"model": tokenizer.get("model"), "added_tokens": added}
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
