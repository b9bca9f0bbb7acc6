"""The recipe's data checked before training starts, where a fault would otherwise strike hours in: every
local stream's index.json read and every shard it lists present, and every stream tokenized with the run's
tokenizer (its tokenizer.json, which `modernbert-data shard` copies into the folder, has the same vocabulary,
merges and added tokens: same-sized vocabularies with the same special ids can still map text differently).
"""

import hashlib
import json
from pathlib import Path

from modernbert_train.train.config import ConfigError
from modernbert_train.train.schema import TrainConfig


def tokenizer_identity(text: str) -> str:
    """A hash of what decides the ids (model: vocabulary and merges; added tokens), not of formatting."""
    tokenizer = json.loads(text)
    added = sorted((token["id"], token["content"]) for token in tokenizer.get("added_tokens") or [])
    essential = {"model": tokenizer.get("model"), "added_tokens": added}
    return hashlib.sha256(json.dumps(essential, sort_keys=True).encode()).hexdigest()


def check_sources(config: TrainConfig, tokenizer_file: Path) -> None:
    """One-line ConfigError naming the source key and file of the first fault found."""
    ours = tokenizer_identity(Path(tokenizer_file).read_text())
    for split in ("train", "eval"):
        for i, source in enumerate(getattr(config.data, split)):
            if source.remote or not source.local:
                continue  # fetched as needed; the remote folder is checked where it is read
            key = f"data.{split}.{i}.local"
            folder = Path(source.local, source.split or "")
            _check_shards(key, folder)
            theirs = folder / "tokenizer.json"
            if theirs.is_file() and tokenizer_identity(theirs.read_text()) != ours:
                raise ConfigError(
                    f"{key}: {folder} was tokenized with another tokenizer (its tokenizer.json differs from "
                    f"the run's {tokenizer_file} in vocabulary, merges or added tokens)"
                )


def _check_shards(key: str, folder: Path) -> None:
    index = folder / "index.json"
    if not index.is_file():
        raise ConfigError(f"{key}: {folder} has no index.json (not an MDS dataset folder)")
    try:
        shards = json.loads(index.read_text())["shards"]
        names = [
            [entry["basename"] for entry in (shard.get("raw_data"), shard.get("zip_data")) if entry]
            for shard in shards
        ]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{key}: {index} is not a readable MDS index ({type(e).__name__}: {e})") from None
    for shard in names:
        if not any((folder / name).is_file() for name in shard):
            raise ConfigError(
                f"{key}: shard {shard[-1]} listed in {index} is missing ({len(names)} shards listed)"
            )
