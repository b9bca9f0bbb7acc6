"""Load a recipe: schema defaults <- YAML file <- `key=value` overrides, validated before anything heavy.

Every problem becomes a one-line `ConfigError` that names the file (and line) or the override and the key.
"""

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from modernbert_train.model.config import ATTN_BACKENDS
from modernbert_train.optim.schedules import DECAY_SHAPES
from modernbert_train.optim.stable_adamw import IMPLS
from modernbert_train.train.schema import TrainConfig

_TIME_RE = re.compile(r"^(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?(ep|ba|sp|tok|dur)$")
PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16")


class ConfigError(ValueError):
    """A bad recipe or override; the message is one line meant for the user."""


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """The recipe at `path` (a local file, or a URI: fetched, and named by its URI in errors)."""
    from modernbert_train import storage

    if not storage.is_uri(path):
        return _load_config(Path(path), overrides)
    try:
        with storage.local_file(path) as local:
            try:
                return _load_config(local, overrides)
            except ConfigError as e:
                raise ConfigError(str(e).replace(str(local), storage.display(path))) from None
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except storage.StorageError as e:
        raise ConfigError(str(e)) from None


def _load_config(path: Path, overrides: list[str]) -> TrainConfig:
    schema = OmegaConf.structured(TrainConfig)
    recipe = _read_yaml(path)
    _check_known_keys(schema, recipe, where=lambda key: f"{path}{_yaml_line(path, key)}")
    cfg = _merge(schema, recipe, source=str(path))
    for override in overrides:
        dotted = _parse_override(override)
        _check_known_keys(schema, dotted, where=lambda key, o=override: f"override '{o}'")
        cfg = _merge(cfg, dotted, source=f"override '{override}'")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: cannot resolve {_key_of(e)}: {_first_line(e)}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{path}: missing required value for '{missing[0]}' (set it in the recipe or as {missing[0]}=...)"
        )
    config: TrainConfig = OmegaConf.to_object(cfg)
    _expand_home(config)
    _check_values(config, path)
    return config


def _expand_home(c: TrainConfig) -> None:
    """The recipe's local paths with `~` expanded (a value in YAML or after `key=` never met a shell)."""
    from modernbert_train import storage

    c.save_folder, c.load_path = storage.expand_home(c.save_folder), storage.expand_home(c.load_path)
    c.model.init_from_hf = storage.expand_home(c.model.init_from_hf)
    c.export.hf_dir = storage.expand_home(c.export.hf_dir)
    c.data.tokenizer = storage.expand_home(c.data.tokenizer)
    for source in (*c.data.train, *c.data.eval):
        source.local = storage.expand_home(source.local)


def time_value(text: str) -> float:
    """The number in a Composer time string: '5e10tok' -> 5e10."""
    match = _TIME_RE.match(text)
    if match is None:
        raise ConfigError(f"not a Composer time string: '{text}'")
    return float(text[: -len(match.group(4))])


def time_unit(text: str) -> str:
    """The unit of a Composer time string: '5e10tok' -> 'tok'."""
    match = _TIME_RE.match(text)
    if match is None:
        raise ConfigError(f"not a Composer time string: '{text}'")
    return match.group(4)


def to_yaml(config: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    from modernbert_train import storage

    try:
        storage.decode_text(path.read_bytes(), path)
    except storage.StorageError as e:  # names the line and the byte
        raise ConfigError(str(e)) from None
    try:
        loaded = OmegaConf.load(path)
    except OSError as e:  # OmegaConf's "Invalid loaded object type": a YAML scalar, not a mapping
        raise ConfigError(f"{path}: a recipe must be a mapping of keys to values ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys to values, got a list")
    return loaded


def _parse_override(override: str) -> DictConfig:
    key, eq, _ = override.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
        raise ConfigError(f"bad override '{override}': expected key=value, e.g. max_duration=100ba")
    try:
        return OmegaConf.from_dotlist([override])
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"bad override '{override}': {_first_line(e)}") from None


def _check_known_keys(schema: DictConfig, given: DictConfig, where, prefix: str = "") -> None:
    """Unknown keys with a did-you-mean; the free-form model.overrides is checked in _check_model."""
    for key in given:
        full = f"{prefix}{key}"
        # keys(), not `in`: a structured config hides keys whose value is still MISSING from `in`.
        if key not in schema.keys():  # noqa: SIM118
            known = [f"{prefix}{k}" for k in schema.keys()]  # noqa: SIM118
            close = difflib.get_close_matches(full, known, n=1) or difflib.get_close_matches(
                full, _all_keys(OmegaConf.structured(TrainConfig)), n=1
            )
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where(full)}: unknown key '{full}'{hint}")
        schema_value = schema._get_node(key)
        given_value = given._get_node(key)
        if (
            isinstance(schema_value, DictConfig)
            and not isinstance(given_value, DictConfig)
            and given_value._value() is not None
        ):
            kind = "a list" if isinstance(given_value, ListConfig) else repr(given_value._value())
            raise ConfigError(f"{where(full)}: '{full}' must be a mapping of keys to values, got {kind}")
        if isinstance(schema_value, DictConfig) and schema_value._is_none():
            # An optional section left null (loggers.wandb): check against its dataclass.
            ref_type = schema_value._metadata.ref_type
            schema_value = (
                OmegaConf.structured(ref_type) if dataclasses.is_dataclass(ref_type) else schema_value
            )
        if isinstance(schema_value, DictConfig) and _is_structured(schema_value):
            if isinstance(given_value, DictConfig):
                _check_known_keys(schema_value, given_value, where, prefix=f"{full}.")
        elif isinstance(schema_value, ListConfig) and isinstance(given_value, ListConfig):
            item_schema = _list_item_schema(schema_value)
            if item_schema is not None:
                for i, item in enumerate(given_value):
                    if isinstance(item, DictConfig):
                        _check_known_keys(item_schema, item, where, prefix=f"{full}[{i}].")
        elif isinstance(schema_value, ListConfig) and isinstance(given_value, DictConfig):
            raise ConfigError(
                f"{where(full)}: '{full}' must be a list, got a mapping (a single entry is a one-item list)"
            )


def _is_structured(node: DictConfig) -> bool:
    return OmegaConf.get_type(node) not in (dict, None)


def _list_item_schema(node: ListConfig):
    item_type = node._metadata.element_type
    if dataclasses.is_dataclass(item_type):
        return OmegaConf.structured(item_type)
    return None


def _all_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        child = node._get_node(key)
        keys.append(f"{prefix}{key}")
        if isinstance(child, DictConfig) and _is_structured(child) and not OmegaConf.is_missing(node, key):
            keys += _all_keys(child, f"{prefix}{key}.")
    return keys


def _merge(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        where = source
        if source.endswith((".yaml", ".yml")):
            where += _yaml_line(Path(source), _key_of(e))
        raise ConfigError(f"{where}: bad value for '{_key_of(e)}': {_first_line(e)}") from None


def _key_of(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", None) or getattr(e, "key", None) or "?")


def _first_line(e: Exception) -> str:
    text = getattr(e, "msg", None) or str(e)
    return str(text).strip().splitlines()[0]


def _yaml_line(path: Path, dotted: str) -> str:
    """':N' for the line of `dotted` (a.b[0].c) in the YAML file, '' when it cannot be found."""
    try:
        node = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):
        return ""
    for part in re.findall(r"[^.\[\]]+", dotted):
        if isinstance(node, yaml.MappingNode):
            matches = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
            if not matches:
                return ""
            key_node, node = matches[-1]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return ""
    return f":{line}" if dotted else ""


def _check_values(c: TrainConfig, path: Path) -> None:
    def fail(key: str, message: str):
        raise ConfigError(f"{path}{_yaml_line(path, key)}: '{key}' {message}")

    for key in (
        "max_duration",
        "eval_interval",
        "log_interval",
        "save_interval",
        "scheduler.t_warmup",
        "scheduler.t_decay",
        "scheduler.t_max",
        "data.batch_size_warmup.tokens",
    ):
        value = OmegaConf.select(OmegaConf.structured(c), key)
        if value is not None and not _TIME_RE.match(str(value)):
            fail(key, f"must be a Composer time string like 100ba, 3e9tok or 0.5dur, got '{value}'")
    for key, zero in (("max_duration", "nothing would train"), ("save_interval", "it would never save")):
        value = getattr(c, key)
        if time_value(value) <= 0:
            fail(key, f"must be positive, got '{value}' ({zero})")
    if c.precision not in PRECISIONS:
        fail("precision", f"must be one of {', '.join(PRECISIONS)}, got '{c.precision}'")
    if c.model.attn_backend not in ATTN_BACKENDS:
        fail("model.attn_backend", f"must be one of {', '.join(ATTN_BACKENDS)}, got '{c.model.attn_backend}'")
    if c.optimizer.impl not in IMPLS:
        fail("optimizer.impl", f"must be one of {', '.join(IMPLS)}, got '{c.optimizer.impl}'")
    if c.optimizer.compile and c.optimizer.impl == "optimi":
        fail("optimizer.compile", "compiles our multi-tensor step (foreach), not optimi's; use impl auto")
    if c.scheduler.decay_shape not in (None, *DECAY_SHAPES):
        fail("scheduler.decay_shape", f"must be one of {', '.join(DECAY_SHAPES)}")
    if c.device_train_microbatch_size is not None and c.device_train_microbatch_size <= 0:
        fail("device_train_microbatch_size", "must be a positive integer")
    if c.global_train_batch_size <= 0:
        fail("global_train_batch_size", "must be positive")
    # The launcher's world size; a micro-batch cannot hold more samples than a rank's share of the batch.
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.strip().isdigit() or int(world) < 1:
        raise ConfigError(
            f"environment variable WORLD_SIZE={world!r}: expected the number of ranks (1 or more)"
        )
    world_size = int(world)
    per_rank = c.global_train_batch_size // world_size
    if (c.device_train_microbatch_size or 0) > per_rank:
        fail(
            "device_train_microbatch_size",
            f"must be at most the batch per rank ({c.global_train_batch_size} / {world_size} = {per_rank}"
            f"{', WORLD_SIZE from the environment' if world_size > 1 else ''}), got "
            f"{c.device_train_microbatch_size}",
        )
    _check_masking(c.data.mlm_probability, fail)
    if not 0.0 < c.data.eval_mlm_probability < 1.0:
        fail("data.eval_mlm_probability", f"must be between 0 and 1, got {c.data.eval_mlm_probability}")
    if not c.data.train:
        fail("data.train", "needs at least one source")
    for split in ("train", "eval"):
        for i, source in enumerate(getattr(c.data, split)):
            if not (source.local or source.remote):
                fail(f"data.{split}.{i}", "needs 'local' (an MDS folder) or 'remote'")
    if c.data.max_seq_len < 8:
        fail("data.max_seq_len", "must be at least 8")
    if c.data.eval_batch_size is not None and c.data.eval_batch_size < 1:
        fail(
            "data.eval_batch_size",
            f"must be at least 1 row (null: the micro-batch size), got {c.data.eval_batch_size}",
        )
    if not c.dist_timeout > 0:
        fail("dist_timeout", f"must be a positive number of seconds, got {c.dist_timeout}")
    if c.speed_window < 1:
        fail("speed_window", f"must be at least 1 batch, got {c.speed_window}")
    if c.data.lookahead < 1:
        fail("data.lookahead", f"must be at least 1 (chunks buffered for packing), got {c.data.lookahead}")
    if c.eval_subset_num_batches == 0 or c.eval_subset_num_batches < -1:
        fail(
            "eval_subset_num_batches",
            f"must be a batch count, or -1 for the whole eval split; got {c.eval_subset_num_batches}",
        )
    if c.grad_clip_norm is not None and not c.grad_clip_norm > 0:
        fail("grad_clip_norm", f"must be positive (null: no clipping), got {c.grad_clip_norm}")
    fsdp = c.parallelism.fsdp
    if fsdp is not None and fsdp.state_dict_type not in ("full", "sharded"):
        fail("parallelism.fsdp.state_dict_type", f"must be full or sharded, got '{fsdp.state_dict_type}'")
    if fsdp is not None and c.optimizer.impl == "optimi":
        fail(
            "optimizer.impl",
            "optimi cannot step FSDP-sharded weights (its kernels read raw pointers); use auto",
        )
    if c.autoresume and not (c.run_name and c.save_folder):
        fail("autoresume", "needs run_name and save_folder")
    if c.profile.start_batch is not None and c.profile.start_batch < 1:
        fail("profile.start_batch", f"must be at least 1 (the first batch), got {c.profile.start_batch}")
    if c.profile.batches < 1:
        fail("profile.batches", f"must be at least 1, got {c.profile.batches}")
    _check_locations(c, fail)
    _check_model(c, path, fail)


MASKING_SCHEDULES = {  # shape -> (required keys, optional keys)
    "constant": (("value",), ()),
    "linear": (("start", "end"), ("t_start", "t_end")),
    "step": (("values", "milestones"), ()),
}


def _check_masking(value: Any, fail) -> None:
    """data.mlm_probability: a ratio in (0, 1), or a schedule mapping whose ratios and times are well formed
    (their order is checked once the times are batches, in train/data.py)."""
    key = "data.mlm_probability"
    if not isinstance(value, dict):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, f"must be a ratio or a schedule ({{schedule: linear|step|constant}}), got {value!r}")
        if not 0.0 < value < 1.0:
            fail(key, f"must be between 0 and 1, got {value}")
        return
    shape = value.get("schedule")
    if shape not in MASKING_SCHEDULES:
        fail(f"{key}.schedule", f"must be one of {', '.join(MASKING_SCHEDULES)}, got {shape!r}")
    required, optional = MASKING_SCHEDULES[shape]
    allowed = ("schedule", *required, *optional)
    for name in value:
        if name not in allowed:
            fail(f"{key}.{name}", f"is not a key of a {shape} schedule (keys: {', '.join(allowed)})")
    for name in required:
        if name not in value:
            fail(f"{key}.{name}", f"is required by a {shape} schedule")
    ratios = {name: value[name] for name in ("value", "start", "end") if name in value}
    times = {name: value[name] for name in ("t_start", "t_end") if name in value}
    if shape == "step":
        for name in ("values", "milestones"):
            if not isinstance(value[name], list) or not value[name]:
                fail(f"{key}.{name}", f"must be a non-empty list, got {value[name]!r}")
        if len(value["values"]) != len(value["milestones"]) + 1:
            fail(
                f"{key}.values",
                f"needs one entry more than milestones ({len(value['milestones'])}), "
                f"got {len(value['values'])}",
            )
        ratios |= {f"values.{i}": ratio for i, ratio in enumerate(value["values"])}
        times |= {f"milestones.{i}": time for i, time in enumerate(value["milestones"])}
    for name, ratio in ratios.items():
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
            fail(f"{key}.{name}", f"must be a ratio between 0 and 1, got {ratio!r}")
    for name, time in times.items():
        match = _TIME_RE.match(str(time))
        if match is None or match.group(4) == "ep":
            fail(f"{key}.{name}", f"must be a time in ba, sp, tok or dur, like 900ba or 0.9dur, got {time!r}")


def _check_locations(c: TrainConfig, fail) -> None:
    """Every URI in the recipe well formed and its bucket reachable, before any work starts."""
    from modernbert_train import storage

    locations = {
        "save_folder": c.save_folder,
        "load_path": c.load_path,
        "model.init_from_hf": c.model.init_from_hf,
        "export.hf_dir": c.export.hf_dir,
        "data.tokenizer": c.data.tokenizer,
    }
    for split in ("train", "eval"):
        for i, source in enumerate(getattr(c.data, split)):
            if storage.is_uri(source.local):
                fail(
                    f"data.{split}.{i}.local",
                    f"must be a local folder (the cache of 'remote'), got {source.local}",
                )
            locations[f"data.{split}.{i}.remote"] = source.remote
    for key, location in locations.items():
        try:
            storage.check(location, "")
        except storage.StorageError as e:
            fail(key, str(e).strip())
    hf = c.model.init_from_hf
    if storage.is_uri(hf) and not storage.exists(storage.join(hf, "config.json")):
        fail("model.init_from_hf", f"'{hf}' is not a transformers model folder: no config.json")


def _check_model(c: TrainConfig, path: Path, fail) -> None:
    from modernbert_train.model import ModernBertConfig
    from modernbert_train.storage import is_uri

    hf = c.model.init_from_hf
    if hf is not None and not is_uri(hf) and not Path(hf, "config.json").is_file():
        fail(
            "model.init_from_hf",
            f"'{c.model.init_from_hf}' is not a transformers model folder: no config.json",
        )
    fields = [f.name for f in dataclasses.fields(ModernBertConfig)]
    for key in c.model.overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean 'model.overrides.{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{path}{_yaml_line(path, f'model.overrides.{key}')}: unknown model field "
                f"'model.overrides.{key}'{hint}"
            )
    try:
        ModernBertConfig.from_preset(c.model.preset, **c.model.overrides)
    except (ValueError, KeyError, TypeError) as e:
        fail(
            "model.preset", f"'{c.model.preset}' with model.overrides is not a valid model: {_first_line(e)}"
        )
