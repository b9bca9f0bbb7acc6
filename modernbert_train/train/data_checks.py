"""The recipe's data checked before training starts, where a fault would otherwise strike hours in: every
stream's index.json read and every shard it lists present (a local folder or a bucket: one listing per
stream), and every stream tokenized with the run's tokenizer (its tokenizer.json, which `modernbert-data
shard` copies into the folder, maps text to the same ids (`tokenizer_identity`): same-sized vocabularies with
the same special ids can still map text differently).
"""

import json
import logging
from pathlib import Path

from modernbert_train import storage
from modernbert_train.data.tokens import IDENTITY_PARTS, IDENTITY_RULE, tokenizer_identity
from modernbert_train.train.config import ConfigError
from modernbert_train.train.schema import TrainConfig

log = logging.getLogger(__name__)
METADATA_FILE = "modernbert_data.json"  # written by data_prep next to the shards


def check_sources(config: TrainConfig, tokenizer_file: Path) -> None:
    """One-line ConfigError naming the source key and file of the first fault found."""
    ours = tokenizer_identity(Path(tokenizer_file).read_text())
    for split in ("train", "eval"):
        for i, source in enumerate(getattr(config.data, split)):
            where = "remote" if source.remote else "local"
            key = f"data.{split}.{i}.{where}"
            folder = source_folder(source)
            files = set(storage.list_files(folder))
            _check_shards(key, folder, files)
            theirs, where = _recorded_identity(key, folder, files)
            if theirs is None:
                log.warning(
                    "%s: %s records no tokenizer (no modernbert_data.json identity, no tokenizer.json): its "
                    "ids are taken to be the run's tokenizer's (%s)", key, folder, tokenizer_file,
                )  # fmt: skip
            elif theirs != ours:
                raise ConfigError(
                    f"{key}: {folder} was tokenized with another tokenizer (its {where} differs from the "
                    f"run's {tokenizer_file} in {IDENTITY_PARTS})"
                )


def source_folder(source) -> str:
    """Where a source's shards and modernbert_data.json are: its remote (else local) folder, in its `split`
    subfolder when it names one (as streaming reads it)."""
    base = source.remote or source.local
    return storage.join(base, source.split) if source.split else str(base)


def read_metadata(path: str, key: str) -> dict:
    """A dataset's modernbert_data.json; a damaged one is a one-line error naming the recipe key and file."""
    try:
        metadata = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: {path} is not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("tokenizer", {}), dict):
        raise ConfigError(f"{key}: {path} is not a modernbert_data.json (no 'tokenizer' object); shard again")
    return metadata


def _recorded_identity(key: str, folder: str, files: set[str]) -> tuple[str | None, str]:
    """The identity of the tokenizer a stream was sharded with: recorded in its modernbert_data.json at shard
    time, else (shards from before it was recorded) computed from the tokenizer.json shard copies there."""
    if METADATA_FILE in files:
        recorded = read_metadata(storage.join(folder, METADATA_FILE), key).get("tokenizer", {})
        # An identity recorded by an older rule is another hash of the same tokenizer: the copy decides.
        if recorded.get("identity") is not None and recorded.get("identity_rule") == IDENTITY_RULE:
            return recorded["identity"], f"tokenizer identity recorded in {METADATA_FILE}"
    if "tokenizer.json" in files:
        return tokenizer_identity(storage.read_text(storage.join(folder, "tokenizer.json"))), "tokenizer.json"
    return None, ""


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
