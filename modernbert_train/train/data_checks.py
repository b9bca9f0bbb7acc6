"""The recipe's data checked before training starts, where a fault would otherwise strike hours in: every
stream's index.json read and every shard it lists present (a local folder or a bucket: one listing per
stream), and every stream tokenized with the run's tokenizer (its tokenizer.json, which `modernbert-data
shard` copies into the folder, has the same vocabulary, merges and added tokens: same-sized vocabularies with
the same special ids can still map text differently).
"""

import hashlib
import json
from pathlib import Path

from modernbert_train import storage
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
            where = "remote" if source.remote else "local"
            key = f"data.{split}.{i}.{where}"
            base = source.remote or source.local
            folder = storage.join(base, source.split) if source.split else str(base)
            files = set(storage.list_files(folder))
            _check_shards(key, folder, files)
            if "tokenizer.json" in files:
                theirs = storage.read_text(storage.join(folder, "tokenizer.json"))
                if tokenizer_identity(theirs) != ours:
                    raise ConfigError(
                        f"{key}: {folder} was tokenized with another tokenizer (its tokenizer.json differs "
                        f"from the run's {tokenizer_file} in vocabulary, merges or added tokens)"
                    )


def _check_shards(key: str, folder: str, files: set[str]) -> None:
    index = storage.join(folder, "index.json")
    if "index.json" not in files:
        raise ConfigError(f"{key}: {folder} has no index.json (not an MDS dataset folder)")
    try:
        shards = json.loads(storage.read_text(index))["shards"]
        names = [
            [entry["basename"] for entry in (shard.get("raw_data"), shard.get("zip_data")) if entry]
            for shard in shards
        ]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{key}: {index} is not a readable MDS index ({type(e).__name__}: {e})") from None
    for shard in names:
        if not any(name in files for name in shard):
            raise ConfigError(
                f"{key}: shard {shard[-1]} listed in {index} is missing ({len(names)} shards listed)"
            )
