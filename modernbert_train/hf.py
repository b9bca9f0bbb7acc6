"""Move models to and from transformers' ModernBERT format (config.json + model.safetensors).

Our parameter names are transformers', so weights map one to one; the decoder's weight is the token
embedding (tied), which transformers stores once, under the embedding's name. Weights are read from
safetensors only: a pickled pytorch_model.bin can run code when loaded.

config.json comes in two dialects. transformers 4 names the RoPE bases `global_rope_theta` and
`local_rope_theta` (null: local layers use the global one) and the layout `global_attn_every_n_layers`;
transformers 5 writes `rope_parameters` ({"full_attention": {"rope_theta": ...}, "sliding_attention": ...})
and `layer_types` (one entry per layer) instead. Both are read, and both are written so either version
loads the same model.
"""

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import storage
from .model import ModelConfigError, ModernBertConfig, ModernBertForMaskedLM

TIED_KEY = "decoder.weight"
EMBEDDING_KEY = "model.embeddings.tok_embeddings.weight"
# transformers 5's rope_parameters entries and the transformers 4 key each stands for.
ROPE_LAYER_TYPES = {"full_attention": "global_rope_theta", "sliding_attention": "local_rope_theta"}
# Each special role's BERT and RoBERTa spellings, as data_prep looks them up.
ROLE_SPELLINGS = {"cls": ("[CLS]", "<s>"), "sep": ("[SEP]", "</s>"), "pad": ("[PAD]", "<pad>"),
                  "mask": ("[MASK]", "<mask>")}  # fmt: skip


class HFCheckpointError(ValueError):
    """A transformers checkpoint that cannot become (or come from) our model; the message says why."""


def config_from_hf(values: dict, mask_token_id: int | None = None) -> ModernBertConfig:
    """Our config from a transformers config.json dict; keys only transformers uses are dropped."""
    model_type = values.get("model_type")
    if model_type != "modernbert":
        raise HFCheckpointError(f"config.json: model_type is {model_type!r}, expected 'modernbert'")
    if values.get("tie_word_embeddings", True) is False:
        raise HFCheckpointError("config.json: tie_word_embeddings is false; only tied decoders are supported")
    names = {f.name for f in dataclasses.fields(ModernBertConfig)} - {"attn_backend"}
    kwargs = {key: value for key, value in values.items() if key in names}
    if "initializer_cutoff_factor" in kwargs and kwargs["initializer_cutoff_factor"] is None:
        kwargs["initializer_cutoff_factor"] = 3.0  # transformers' meaning of null
    kwargs.update(_rope_thetas(values))
    kwargs.update(_layer_pattern(values))
    # transformers' config has no mask token; the checkpoint's tokenizer knows it. Without either,
    # ModernBERT's own id stands, where the vocabulary holds it.
    if "mask_token_id" not in kwargs and mask_token_id is not None:
        kwargs["mask_token_id"] = mask_token_id
    vocab_size = kwargs.get("vocab_size", ModernBertConfig.vocab_size)
    default_mask = ModernBertConfig.mask_token_id
    if "mask_token_id" not in kwargs and isinstance(vocab_size, int) and vocab_size <= default_mask:
        raise HFCheckpointError(
            "config.json has no mask_token_id, and no tokenizer.json with a [MASK] or <mask> token lies "
            f"beside it; ModernBERT's own ({default_mask}) is outside vocab_size={vocab_size}. Add "
            "mask_token_id to config.json, or the tokenizer.json the model was trained with"
        )
    try:
        return ModernBertConfig(**kwargs)
    except ModelConfigError as error:
        raise HFCheckpointError(f"config.json: {error}") from None


def _rope_thetas(values: dict) -> dict:
    """global_rope_theta and local_rope_theta from either dialect; where both give one they must agree."""
    if values.get("rope_scaling"):
        raise HFCheckpointError(f"config.json: rope_scaling={values['rope_scaling']!r} is unsupported")
    parameters = values.get("rope_parameters") or {}
    if not isinstance(parameters, dict) or set(parameters) - set(ROPE_LAYER_TYPES):
        raise HFCheckpointError(
            f"config.json: rope_parameters={parameters!r} is unsupported; expected a dict keyed by "
            + " and ".join(ROPE_LAYER_TYPES)
        )
    thetas = {}
    for layer_type, name in ROPE_LAYER_TYPES.items():  # global first: a null local theta refers to it
        theta = _rope_theta(layer_type, parameters.get(layer_type))
        if name not in values:
            legacy = None
        elif values[name] is None:  # transformers 4: local layers use the global theta
            legacy = thetas.get("global_rope_theta", ModernBertConfig.global_rope_theta)
        else:
            legacy = values[name]
        if theta is not None and legacy is not None and float(theta) != float(legacy):
            raise HFCheckpointError(
                f"config.json: rope_parameters.{layer_type}.rope_theta={theta} disagrees with {name}="
                + (f"null (the global theta, {legacy})" if values[name] is None else f"{legacy}")
            )
        if theta is not None:
            thetas[name] = theta
        elif name in values:
            thetas[name] = values[name]
    return thetas


def _rope_theta(layer_type: str, parameters: dict | None) -> float | None:
    """The theta in one transformers 5 rope_parameters entry (None where it gives none); only plain RoPE
    is supported, so a scaled variant is refused rather than run as plain RoPE."""
    if parameters is None:
        return None
    where = f"config.json: rope_parameters.{layer_type}"
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise HFCheckpointError(f"{where}.rope_type={rope_type!r} is unsupported; only 'default' RoPE is")
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFCheckpointError(
            f"{where}.partial_rotary_factor={parameters['partial_rotary_factor']} is unsupported; only 1.0 is"
        )
    unknown = sorted(set(parameters) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if unknown:
        raise HFCheckpointError(f"{where} has unsupported keys: {', '.join(unknown)}")
    return parameters.get("rope_theta")


def _layer_pattern(values: dict) -> dict:
    """global_attn_every_n_layers from transformers 5's layer_types, which must be that pattern: a
    full-attention layer every n layers starting with the first, sliding-window attention between."""
    layer_types = values.get("layer_types")
    if layer_types is None:
        return {}

    def pattern(n: int) -> list[str]:
        return ["sliding_attention" if i % n else "full_attention" for i in range(len(layer_types))]

    num_layers = values.get("num_hidden_layers", len(layer_types))
    if len(layer_types) != num_layers:
        raise HFCheckpointError(
            f"config.json: layer_types has {len(layer_types)} entries but num_hidden_layers={num_layers}"
        )
    every_n = values.get("global_attn_every_n_layers")
    if every_n is not None:
        if not isinstance(every_n, int) or every_n < 1 or pattern(every_n) != layer_types:
            raise HFCheckpointError(
                f"config.json: layer_types={layer_types} disagrees with global_attn_every_n_layers={every_n}"
            )
        return {}
    every_n = next((n for n in range(1, len(layer_types) + 1) if pattern(n) == layer_types), None)
    if every_n is None:
        raise HFCheckpointError(
            f"config.json: layer_types={layer_types} is unsupported; expected full_attention every n layers "
            "from the first, sliding_attention between"
        )
    return {"global_attn_every_n_layers": every_n}


def config_to_hf(config: ModernBertConfig) -> dict:
    """A transformers config.json dict for `config`, in both dialects (transformers 4 and 5 each ignore
    the other's keys)."""
    values = {key: value for key, value in config.to_dict().items() if key != "attn_backend"}
    # transformers 5 takes a null local_rope_theta as the theta itself: write the one local layers use.
    if values["local_rope_theta"] is None:
        values["local_rope_theta"] = config.global_rope_theta
    global_layers = [config.is_global_layer(i) for i in range(config.num_hidden_layers)]
    return {
        "model_type": "modernbert",
        "architectures": ["ModernBertForMaskedLM"],
        **values,
        "layer_types": ["full_attention" if full else "sliding_attention" for full in global_layers],
        "rope_parameters": {
            layer_type: {"rope_type": "default", "rope_theta": values[name]}
            for layer_type, name in ROPE_LAYER_TYPES.items()
        },
        "bos_token_id": config.cls_token_id,
        "eos_token_id": config.sep_token_id,
        "tie_word_embeddings": True,
    }


def _mask_token_id_from_tokenizer(folder: Path) -> int | None:
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    tokenizer = _read_json(tokenizer_file)
    added = tokenizer.get("added_tokens") if isinstance(tokenizer, dict) else None
    try:
        return next((token["id"] for token in added or [] if token["content"] in ("[MASK]", "<mask>")), None)
    except (TypeError, KeyError):
        raise HFCheckpointError(
            f"{tokenizer_file}: not a tokenizer.json (its added_tokens are malformed)"
        ) from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        listed = _read_json(index)
        weight_map = listed.get("weight_map") if isinstance(listed, dict) else None
        if not isinstance(weight_map, dict):
            raise HFCheckpointError(f"{index}: no weight_map")
        shards = sorted(set(weight_map.values()))
        return {key: value for shard in shards for key, value in _load_safetensors(folder / shard).items()}
    if (folder / "pytorch_model.bin").is_file():
        raise HFCheckpointError(
            f"{folder}: only pytorch_model.bin found; convert it to model.safetensors "
            "(pickled weights are not loaded because they can run code)"
        )
    raise HFCheckpointError(f"{folder}: no model.safetensors")


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing, truncated or damaged one is a one-line HFCheckpointError."""
    if not file.is_file():
        raise HFCheckpointError(f"{file}: missing (named by the folder's model.safetensors.index.json)")
    try:
        return load_file(file)
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise HFCheckpointError(f"{file}: cannot be read (truncated or damaged?): {reason}") from None


def _summarise(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return f"{kind} ({len(keys)}): {shown}"


def read_hf_config(path: str | Path) -> ModernBertConfig:
    """Our config from a transformers ModernBERT folder's config.json (and its tokenizer's [MASK] id)."""
    if storage.is_uri(path):
        with storage.local_folder(path) as folder:
            return read_hf_config(folder)
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise HFCheckpointError(f"{folder}: no config.json")
    values = _read_json(config_file)
    if not isinstance(values, dict):
        raise HFCheckpointError(f"{config_file}: not a model config (a JSON object)")
    mask_token_id = _mask_token_id_from_tokenizer(folder)
    try:
        return config_from_hf(values, mask_token_id)
    except HFCheckpointError as error:  # "config.json: ..." -> the file's path, so a user knows which folder
        message = str(error)
        if message.startswith("config.json"):
            message = f"{config_file}{message.removeprefix('config.json')}"
        raise HFCheckpointError(message) from None


def check_data_tokenizer(path: str | Path, data_tokenizer: str | Path) -> None:
    """Continued pretraining feeds the checkpoint's embeddings the data's ids, so the data must be sharded
    with the checkpoint's own tokenizer, or one that only adds tokens after its ids (domain tokens in the
    padded vocabulary's spare rows). Equal special ids and vocabulary sizes do not show that (two tokenizers
    trained alike share both): the tokenizer.json beside the checkpoint, where there is one, is compared
    with the data's by what decides the ids (read through `tokenizers`, so a copy written by another
    tokenizers version, merges as "a b" or as pairs, is the same tokenizer)."""
    file = storage.join(path, "tokenizer.json") if storage.is_uri(path) else Path(path, "tokenizer.json")
    if not (storage.exists(file) if storage.is_uri(path) else file.is_file()):
        return
    from .data.tokens import IDENTITY_PARTS, tokenizer_identity  # here: hf.py otherwise needs no data code

    theirs, ours = _tokenizer_json(file), _tokenizer_json(data_tokenizer)
    if tokenizer_identity(json.dumps(theirs)) == tokenizer_identity(json.dumps(ours)):
        return
    size = _tokenizer_size(theirs)
    kept = {**ours, "added_tokens": [t for t in ours.get("added_tokens") or [] if t.get("id", 0) < size]}
    if tokenizer_identity(json.dumps(kept)) == tokenizer_identity(json.dumps(theirs)):
        return  # the checkpoint's tokenizer with tokens added after its last id
    raise HFCheckpointError(
        f"{file} is not the tokenizer the data was sharded with ({data_tokenizer}), nor extended by added "
        f"tokens after its ids: their {IDENTITY_PARTS} differ, so the checkpoint's embeddings would be fed "
        f"other tokens' ids; shard the data with modernbert-data shard --tokenizer {path}"
    )


def _tokenizer_json(file: str | Path) -> dict:
    """A tokenizer.json as `tokenizers` writes it back (one layout whatever version wrote the file)."""
    from tokenizers import Tokenizer

    try:
        text = storage.decode_text(storage.read_bytes(file), file)
        return json.loads(Tokenizer.from_str(text).to_str())
    except storage.StorageError as error:
        raise HFCheckpointError(str(error)) from None
    except OSError as error:
        raise HFCheckpointError(f"{file}: {error.strerror or error}") from None
    except Exception as error:  # tokenizers raises plain Exception for a malformed file
        raise HFCheckpointError(
            f"{file}: not a tokenizer.json ({' '.join(str(error).split())[:200]})"
        ) from None


def _tokenizer_size(tokenizer: dict) -> int:
    """One past the highest id of a tokenizer.json's vocabulary and added tokens."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(tokenizer)).get_vocab_size(with_added_tokens=True)


def _read_json(file: Path):
    """A JSON file of a model folder; one that is not UTF-8 JSON is a one-line HFCheckpointError."""
    try:
        return json.loads(storage.decode_text(file.read_bytes(), file))
    except storage.StorageError as error:  # not UTF-8: the file, line and byte
        raise HFCheckpointError(str(error)) from None
    except json.JSONDecodeError as error:
        raise HFCheckpointError(f"{file}: not valid JSON ({' '.join(str(error).split())[:200]})") from None


def from_hf(path: str | Path) -> ModernBertForMaskedLM:
    """Load a transformers ModernBertForMaskedLM folder (config.json + model.safetensors) as our model."""
    if storage.is_uri(path):
        with storage.local_folder(path) as folder:
            return from_hf(folder)
    folder = Path(path)
    config = read_hf_config(folder)
    weights = _read_weights(folder)

    model = ModernBertForMaskedLM(config)
    expected = model.state_dict()
    tied = weights.pop(TIED_KEY, None)
    if tied is not None and EMBEDDING_KEY in weights and not torch.equal(tied, weights[EMBEDDING_KEY]):
        raise HFCheckpointError(
            f"{folder}: {TIED_KEY} differs from {EMBEDDING_KEY}; untied decoders are unsupported"
        )
    if tied is not None:
        weights.setdefault(EMBEDDING_KEY, tied)
    problems = []
    missing = sorted(set(expected) - set(weights) - {TIED_KEY})
    unexpected = sorted(set(weights) - set(expected))
    misshaped = sorted(
        f"{key} {list(weights[key].shape)} != {list(expected[key].shape)}"
        for key in set(weights) & set(expected)
        if weights[key].shape != expected[key].shape
    )
    for kind, keys in (
        ("missing weights", missing),
        ("unexpected weights", unexpected),
        ("wrong shapes", misshaped),
    ):
        if keys:
            problems.append(_summarise(kind, keys))
    if problems:
        raise HFCheckpointError(f"{folder}: weights do not fit the config: " + "; ".join(problems))
    model.load_state_dict(weights, strict=False)
    return model


def to_hf(model: ModernBertForMaskedLM, out_dir: str | Path, tokenizer=None) -> Path | str:
    """Write `model` as a transformers ModernBERT folder; with `tokenizer` (a tokenizer.json path, a folder
    holding one, a tokenizers.Tokenizer or a transformers tokenizer) also its tokenizer files. A URI
    `out_dir` is written locally, then uploaded (config.json last)."""
    if storage.is_uri(out_dir):
        with tempfile.TemporaryDirectory(prefix="modernbert-hf-") as staging:
            to_hf(model, staging, tokenizer)
            storage.upload_folder(staging, out_dir, last=["config.json"])
        return out_dir
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    weights = model.state_dict()
    if TIED_KEY in weights and not torch.equal(weights[TIED_KEY], weights[EMBEDDING_KEY]):
        # transformers ties them on load: an untied decoder would be replaced by the embeddings silently.
        raise ValueError(f"cannot export: {TIED_KEY} is not tied to {EMBEDDING_KEY}")
    # The tokenizer is checked before anything is written, and config.json, which marks a model folder,
    # is written last: a refused tokenizer or a failed write leaves no folder that looks finished.
    hf_tokenizer = transformers_tokenizer(tokenizer, model.config) if tokenizer is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in weights.items() if key != TIED_KEY}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    # safetensors 0.8 writes through a temporary file and leaves it 0600; the umask decides, as for the rest.
    umask = os.umask(0)
    os.umask(umask)
    (out / "model.safetensors").chmod(0o666 & ~umask)
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
    return out


def _unk_token(tokenizer) -> str | None:
    """The token the tokenizer's model maps unknown input to (WordPiece's and BPE's `unk_token`, Unigram's
    `unk_id`), else a BERT or RoBERTa spelling in its vocabulary; None when it has none (byte-level BPE)."""
    model = json.loads(tokenizer.to_str()).get("model", {})
    named = model.get("unk_token")
    if model.get("type") == "Unigram" and isinstance(model.get("unk_id"), int):
        named = tokenizer.id_to_token(model["unk_id"])
    for token in (named, "[UNK]", "<unk>"):
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return token
    return None


def check_vocabulary(size: int, config: ModernBertConfig) -> None:
    if size > config.vocab_size:
        raise HFCheckpointError(
            f"tokenizer: its {size} tokens do not fit the model's vocab_size={config.vocab_size}; export the "
            "tokenizer the model was trained with"
        )


def transformers_tokenizer(tokenizer, config: ModernBertConfig):
    """`tokenizer` (see to_hf) as a transformers tokenizer that AutoTokenizer.from_pretrained loads, once
    saved, with ModernBERT's special tokens at the config's ids; one that does not fit the config is
    refused."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        check_vocabulary(len(tokenizer), config)
        for role in ("cls", "sep", "pad", "mask"):
            theirs, ours = getattr(tokenizer, f"{role}_token_id"), getattr(config, f"{role}_token_id")
            if theirs != ours:
                raise HFCheckpointError(
                    f"tokenizer: its {role}_token_id is {theirs}, the model config's {ours}; export the "
                    "tokenizer the model was trained with"
                )
        return tokenizer
    if isinstance(tokenizer, str | Path):
        file = storage.file_in(tokenizer, "tokenizer.json")
        try:
            tokenizer = Tokenizer.from_str(storage.read_text(file))
        except FileNotFoundError:
            raise HFCheckpointError(f"tokenizer: {file} does not exist") from None
    else:
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: the post-processor may be set below
    check_vocabulary(tokenizer.get_vocab_size(with_added_tokens=True), config)
    special = {}
    for role in ("cls", "sep", "pad", "mask"):
        token_id = getattr(config, f"{role}_token_id")
        token = tokenizer.id_to_token(token_id)
        if token is None:
            raise HFCheckpointError(f"tokenizer: no token has the config's {role}_token_id={token_id}")
        # A tokenizer whose [PAD] (say) has another id than the config's is not the one the model was
        # trained with; exporting it would name some other token the pad token.
        spelled = next((t for t in ROLE_SPELLINGS[role] if tokenizer.token_to_id(t) is not None), None)
        if token not in ROLE_SPELLINGS[role] and spelled is not None:
            raise HFCheckpointError(
                f"tokenizer: its {spelled} is id {tokenizer.token_to_id(spelled)}, but the model config's "
                f"{role}_token_id={token_id} is {token!r}; export the tokenizer the model was trained with"
            )
        special[f"{role}_token"] = token
    unk = _unk_token(tokenizer)
    if unk is not None:
        special["unk_token"] = unk
    if tokenizer.post_processor is None:
        # Like ModernBERT's own tokenizer: [CLS] text [SEP] for single inputs and pairs.
        cls, sep = special["cls_token"], special["sep_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B {sep}",
            special_tokens=[(cls, config.cls_token_id), (sep, config.sep_token_id)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=config.max_position_embeddings,
        model_input_names=["input_ids", "attention_mask"],
        **special,
    )
