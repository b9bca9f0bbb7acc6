"""Find and load the tokenizer the shards are written with: a tokenizer.json, a folder, a URI of either,
or a hub name."""

import atexit
import json
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from data_prep.errors import UsageError
from modernbert_train import storage

# Where neither a flag nor a tokenizer_config.json names them, these are the usual spellings (BERT, then
# RoBERTa). The ids found are recorded in modernbert_data.json, where training and export read them.
SPECIAL_TOKEN_SPELLINGS = {
    "unk_token": ("[UNK]", "<unk>"),
    "cls_token": ("[CLS]", "<s>"),
    "sep_token": ("[SEP]", "</s>"),
    "pad_token": ("[PAD]", "<pad>"),
    "mask_token": ("[MASK]", "<mask>"),
}
# What training needs (the masking, the packing and the document wrapping), each with the flag that names it.
REQUIRED_SPECIAL_TOKENS = {
    "cls_token": "--cls-token",
    "sep_token": "--sep-token",
    "pad_token": "--pad-token",
    "mask_token": "--mask-token",
}
# Files copied next to the shards with tokenizer.json when the tokenizer has them.
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json")
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class LoadedTokenizer:
    spec: str  # what the user passed
    json_path: Path
    json_text: str
    vocab_size: int  # one past the largest id, added tokens included
    special_token_ids: dict[str, int | None]  # cls_token_id, sep_token_id, ... (None when absent)

    @property
    def dtype(self) -> str:
        """The smallest unsigned dtype that holds every token id."""
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"

    def companion_files(self) -> list[Path]:
        return [p for p in (self.json_path.with_name(n) for n in COMPANION_FILES) if p.is_file()]


def for_sharding(tokenizer: Tokenizer) -> Tokenizer:
    """Whole documents, untruncated, unpadded; special-token strings in the text are plain text."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.encode_special_tokens = True
    return tokenizer


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub's host takes a connection. Unreachable, hf_hub_download retries for about half a
    minute, printing each retry, before it says so: a typo in a local path on an offline node."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _hub_tokenizer_json(name: str) -> Path:
    from huggingface_hub import hf_hub_download

    online = hub_reachable()
    try:  # offline, the hub cache may still hold it
        path = Path(hf_hub_download(name, "tokenizer.json", local_files_only=not online))
    except Exception as error:  # unknown repo, no tokenizer.json, not cached: all mean "not found"
        if not online:
            raise UsageError(
                f"--tokenizer {name}: no such local file or folder, and the hub is unreachable from here "
                "(its local cache has no tokenizer.json for it either)"
            ) from error
        reason = " ".join(str(error).split())[:200]
        raise UsageError(
            f"--tokenizer {name}: no such local file or folder, and the hub has no tokenizer.json for it "
            f"({type(error).__name__}: {reason})"
        ) from error
    for companion in COMPANION_FILES:
        try:  # lands next to tokenizer.json in the hub cache
            hf_hub_download(name, companion, local_files_only=not online)
        except Exception:  # optional files: their absence only means default special-token names
            continue
    return path


def _fetched_tokenizer_json(spec: str) -> Path:
    """A URI's tokenizer.json (the object, or the one under the URI as a folder) and its companion files,
    fetched into a folder of their own that lasts as long as the process."""
    uri = storage.file_in(spec, "tokenizer.json")
    local = Path(tempfile.mkdtemp(prefix="modernbert-tokenizer-"))
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    try:
        storage.download_file(uri, local / "tokenizer.json")
    except FileNotFoundError:
        raise UsageError(f"--tokenizer {spec}: {uri} does not exist") from None
    folder = uri.rpartition("/")[0]
    for companion in COMPANION_FILES:
        try:
            storage.download_file(storage.join(folder, companion), local / companion)
        except FileNotFoundError:  # optional files: their absence only means default special-token names
            continue
    return local / "tokenizer.json"


def _resolve_json(spec: str) -> Path:
    if storage.is_uri(spec):
        return _fetched_tokenizer_json(spec)
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise UsageError(f"--tokenizer {spec}: the folder holds no tokenizer.json")
        return path / "tokenizer.json"
    if spec.endswith(".json") or not HUB_NAME.match(spec):
        raise UsageError(f"--tokenizer {spec}: no such file or folder")
    return _hub_tokenizer_json(spec)


def _special_token_ids(tokenizer: Tokenizer, json_path: Path, named: dict[str, str]) -> dict[str, int | None]:
    """Each special token's id: as `named` (from flags), else as tokenizer_config.json names it, else the
    first usual spelling the vocabulary has."""
    config_path = json_path.with_name("tokenizer_config.json")
    configured = {}
    if config_path.is_file():
        try:
            configured = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            reason = " ".join(str(error).split())[:200]
            raise UsageError(f"{config_path}: not a tokenizer_config.json (not JSON: {reason})") from None
        if not isinstance(configured, dict):
            raise UsageError(f"{config_path}: not a tokenizer_config.json (not a JSON object)")
    ids = {}
    for key, spellings in SPECIAL_TOKEN_SPELLINGS.items():
        if named.get(key):
            ids[f"{key}_id"] = tokenizer.token_to_id(named[key])
            if ids[f"{key}_id"] is None:
                flag = REQUIRED_SPECIAL_TOKENS[key]
                raise UsageError(f"{flag} {named[key]}: {json_path} has no such token")
            continue
        value = configured.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        candidates = (content,) if content else spellings
        found = (tokenizer.token_to_id(token) for token in candidates)
        ids[f"{key}_id"] = next((i for i in found if i is not None), None)
        if content and ids[f"{key}_id"] is None and key in REQUIRED_SPECIAL_TOKENS:
            raise UsageError(
                f"{config_path} names {key} {content!r}, which {json_path.name} does not have; name the "
                f"token with {REQUIRED_SPECIAL_TOKENS[key]} TOKEN"
            )
    return ids


def load_tokenizer(spec: str, named: dict[str, str] | None = None) -> LoadedTokenizer:
    """The tokenizer at `spec`, with its special-token ids; `named` maps cls_token, sep_token, pad_token,
    mask_token to their spelling where the tokenizer's own files do not say. A tokenizer that lacks one
    of those is refused, naming the flag that would name it."""
    json_path = _resolve_json(spec)
    try:
        json_text = storage.decode_text(json_path.read_bytes(), json_path)
    except storage.StorageError as error:  # names the line and the byte
        raise UsageError(f"--tokenizer {spec}: {error}") from None
    try:
        tokenizer = Tokenizer.from_str(json_text)
        special_token_ids = _special_token_ids(tokenizer, json_path, named or {})
    except UsageError:
        raise
    except Exception as error:  # tokenizers raises plain Exception for a malformed file
        raise UsageError(f"--tokenizer {spec}: cannot load {json_path}: {str(error)[:200]}") from error
    for key, flag in REQUIRED_SPECIAL_TOKENS.items():
        if special_token_ids[f"{key}_id"] is None:
            spellings = " or ".join(SPECIAL_TOKEN_SPELLINGS[key])
            raise UsageError(
                f"--tokenizer {spec}: no {key.replace('_', ' ')} ({spellings}) and none named in its "
                f"tokenizer_config.json; name it with {flag} TOKEN"
            )
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    return LoadedTokenizer(spec, json_path, json_text, vocab_size, special_token_ids)
