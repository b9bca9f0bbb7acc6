"""The recipe's `data` section -> train and eval loaders over MDS shards, and their tokenizer."""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from composer.utils import dist
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from modernbert_train import storage
from modernbert_train.data import (
    BatchSizeSchedule,
    MaskingSchedule,
    TokenizerInfo,
    batch_size_schedule,
    build_dataloader,
    build_eval_dataset,
    build_train_dataset,
)
from modernbert_train.train.config import ConfigError, time_unit, time_value
from modernbert_train.train.data_checks import check_sources, read_metadata, source_folder
from modernbert_train.train.schema import DataSourceConfig, TrainConfig

METADATA_FILE = "modernbert_data.json"  # written by data_prep next to the shards
SPECIAL_TOKENS = {"pad_id": "[PAD]", "cls_id": "[CLS]", "sep_id": "[SEP]", "mask_id": "[MASK]"}


@dataclass
class TrainData:
    train_loader: DataLoader
    eval_loader: DataLoader | None
    tokenizer_file: Path
    tokenizer_info: TokenizerInfo
    eval_batch_size: int  # rows per device


def tokenizer_file(config: TrainConfig) -> Path:
    """data.tokenizer, else the tokenizer.json that data_prep leaves in the first train source's folder
    (of a `remote` source: fetched into its `local` cache, or a temporary folder)."""
    given = config.data.tokenizer
    first = config.data.train[0]
    if given is None and first.remote:
        cache = Path(first.local or storage.scratch_folder("modernbert-tokenizer-"))
        try:
            return storage.download_file(
                storage.join(first.remote, "tokenizer.json"), cache / "tokenizer.json"
            )
        except FileNotFoundError:
            raise ConfigError(
                f"data.train.0.remote: no tokenizer.json in {first.remote} (set data.tokenizer)"
            ) from None
    if storage.is_uri(given):
        cache = storage.scratch_folder("modernbert-tokenizer-")
        uri = storage.file_in(given, "tokenizer.json")
        try:
            return storage.download_file(uri, cache / uri.rpartition("/")[2])
        except FileNotFoundError:
            raise ConfigError(f"data.tokenizer: no tokenizer at {given}") from None
    source = first.local
    if given is None and source is None:
        raise ConfigError("data.tokenizer: needed when the first train source has no 'local' folder")
    path = Path(
        storage.file_in(given, "tokenizer.json") if given is not None else Path(source, "tokenizer.json")
    )
    if not path.is_file():
        key = "data.tokenizer" if given is not None else "data.train.0.local"
        raise ConfigError(
            f"{key}: no tokenizer at {path} (build the data with modernbert-data, or set data.tokenizer)"
        )
    return path


def recorded_special_ids(config: TrainConfig) -> dict[str, int] | None:
    """The special-token ids data_prep found (BERT or RoBERTa spellings, or named by flags) and recorded in
    the first train source's modernbert_data.json; None for shards without one."""
    source = config.data.train[0]
    metadata = storage.join(source_folder(source), METADATA_FILE)
    if not storage.exists(metadata):
        return None
    recorded = read_metadata(metadata, f"data.train.0.{'remote' if source.remote else 'local'}").get(
        "tokenizer", {}
    )
    ids = {field: recorded.get(f"{field[: -len('_id')]}_token_id") for field in SPECIAL_TOKENS}
    missing = [field for field, value in ids.items() if value is None]
    if missing:
        raise ConfigError(
            f"data.train.0: {metadata} records no {missing[0][: -len('_id')]} token id; shard the data again "
            "with modernbert-data (--pad-token and --mask-token name them)"
        )
    return ids


def tokenizer_info(path: Path, recorded: dict[str, int] | None = None) -> TokenizerInfo:
    """The special-token ids as the shards' metadata records them (`recorded`), else ModernBERT's spellings
    looked up in the tokenizer; the vocabulary size from the tokenizer."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ConfigError(f"tokenizer {path} cannot be read: {str(e).splitlines()[0]}") from None
    specials = tuple(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
    if recorded is not None:
        return TokenizerInfo(vocab_size=tokenizer.get_vocab_size(), special_ids=specials, **recorded)
    ids = {}
    for field, token in SPECIAL_TOKENS.items():
        ids[field] = tokenizer.token_to_id(token)
        if ids[field] is None:
            raise ConfigError(
                f"tokenizer {path} has no {token} token (ModernBERT needs [PAD] [CLS] [SEP] [MASK])"
            )
    return TokenizerInfo(vocab_size=tokenizer.get_vocab_size(), special_ids=specials, **ids)


def check_shards_match(config: TrainConfig, info: TokenizerInfo) -> None:
    """Shards written with another tokenizer would train on wrong ids: compare their modernbert_data.json."""
    ours = {
        "vocab_size": info.vocab_size,
        "pad_token_id": info.pad_id,
        "cls_token_id": info.cls_id,
        "sep_token_id": info.sep_id,
        "mask_token_id": info.mask_id,
    }
    for split in ("train", "eval"):
        for i, source in enumerate(getattr(config.data, split)):
            folder = source_folder(source)
            metadata = storage.join(folder, METADATA_FILE)
            if not storage.exists(metadata):
                continue
            where = f"data.{split}.{i}.{'remote' if source.remote else 'local'}"
            theirs = read_metadata(metadata, where).get("tokenizer", {})
            differing = [f"{k}={theirs[k]} there, {v} here" for k, v in ours.items() if theirs.get(k, v) != v]
            if differing:
                key = "remote" if source.remote else "local"
                raise ConfigError(
                    f"data.{split}.{i}.{key}: {folder} was tokenized with another "
                    f"tokenizer ({'; '.join(differing)})"
                )


def sources(items: list[DataSourceConfig]) -> list[dict]:
    return [{k: v for k, v in asdict(item).items() if v is not None} for item in items]


def build_data(config: TrainConfig) -> TrainData:
    data = config.data
    path = tokenizer_file(config)
    info = tokenizer_info(path, recorded_special_ids(config))
    check_shards_match(config, info)
    check_sources(config, path)
    world_size = dist.get_world_size()
    if config.global_train_batch_size % world_size:
        raise ConfigError(
            f"global_train_batch_size={config.global_train_batch_size} is not divisible by the "
            f"{world_size} ranks"
        )
    warmup = _warmup(config)
    rows = rows_schedule(config)
    train = build_train_dataset(
        sources(data.train),
        tokenizer=info,
        max_seq_len=data.max_seq_len,
        global_batch_size=config.global_train_batch_size,
        micro_batch_size=device_microbatch_size(config),
        mlm_probability=masking_schedule(config, rows),
        seed=config.seed,
        lookahead=data.lookahead,
        batch_size_warmup=warmup,
        shuffle=data.shuffle,
        predownload=data.predownload,
        cache_limit=data.cache_limit,
    )
    eval_loader = None
    per_device = data.eval_batch_size or config.device_train_microbatch_size or 8
    if data.eval:
        evaluation = build_eval_dataset(
            sources(data.eval),
            tokenizer=info,
            max_seq_len=data.max_seq_len,
            global_batch_size=per_device * world_size,
            mlm_probability=data.eval_mlm_probability,
            seed=config.seed,
            lookahead=data.lookahead,
        )
        eval_loader = build_dataloader(evaluation, num_workers=data.num_workers, pin_memory=pin_memory())
    return TrainData(
        build_dataloader(train, num_workers=data.num_workers, pin_memory=pin_memory()),
        eval_loader,
        path,
        info,
        per_device,
    )


def pin_memory() -> bool:
    """Whether the loaders put their batches in pinned host memory: on CUDA, where the Trainer runs then.
    Composer copies each micro-batch to the device with non_blocking=True, which from pageable memory first
    waits for everything queued on the stream: under gradient accumulation, every micro-batch after the first
    would wait for the previous one's backward, and the GPU would idle while the host launches the next."""
    return torch.cuda.is_available()


def _warmup(config: TrainConfig) -> dict[str, int] | None:
    warmup = config.data.batch_size_warmup
    return {"start": warmup.start, "tokens": int(time_value(warmup.tokens))} if warmup.start else None


def rows_schedule(config: TrainConfig) -> BatchSizeSchedule:
    """The rows of every global batch under `config` on this world size."""
    return batch_size_schedule(
        global_batch_size=config.global_train_batch_size,
        max_seq_len=config.data.max_seq_len,
        micro_batch_size=device_microbatch_size(config),
        batch_size_warmup=_warmup(config),
    )


def masking_rate_at(config: TrainConfig, clock: dict[str, int]) -> float:
    """The masking ratio of the first batch after a checkpoint saved at `clock` ({"batch": ..., "sample":
    ...}): a schedule over batch indices reads the batch count, one over rows the rows trained (Composer's
    samples: rows, all ranks)."""
    schedule = masking_schedule(config, rows_schedule(config))
    return schedule.rate(clock["batch"] if schedule.unit == "batch" else clock["sample"])


def masking_schedule(config: TrainConfig, rows: BatchSizeSchedule) -> MaskingSchedule:
    """data.mlm_probability (checked in shape by train/config.py) as a schedule over the run, every time
    known before the run starts, so a resumed run masks each batch as the straight run did. Times in ba (and
    'dur' of a max_duration in ba) are global batch indices; times in sp and tok (tok counts row slots, as
    batch_size_warmup does; 'dur' of a max_duration in sp or tok) are rows trained, which stay right when a
    resumed run changes the batch size. A schedule mixing both places its sp and tok times at batch indices
    of this recipe's batch sizes (`rows`); recipe_changes.py refuses a resume that changes those sizes."""
    spec = config.data.mlm_probability
    if not isinstance(spec, dict):
        return MaskingSchedule((float(spec),))
    key = "data.mlm_probability"
    data_len = config.data.max_seq_len

    def place(name: str, text: str) -> tuple[str, int]:
        """(unit, position): a batch index ("batch") or rows trained ("row")."""
        amount, unit = time_value(text), time_unit(text)
        if unit == "ba":
            return "batch", round(amount)
        if unit in ("sp", "tok"):
            return "row", math.ceil(amount / (data_len if unit == "tok" else 1))
        if unit == "dur":
            if time_unit(config.max_duration) == "ep":
                raise ConfigError(
                    f"{key}.{name}: a 'dur' time needs max_duration in ba, sp or tok, "
                    f"got {config.max_duration}"
                )
            total_unit, total = place("max_duration", config.max_duration)
            return total_unit, round(amount * total)
        raise ConfigError(f"{key}.{name}: must be a time in ba, sp, tok or dur, got '{text}'")

    def positions(times: dict[str, str]) -> tuple[str, list[int]]:
        placed = [place(name, text) for name, text in times.items()]
        units = {unit for unit, position in placed if position}  # a zero time is the same in every unit
        if units == {"row"}:
            return "row", [position for _, position in placed]
        return "batch", [rows.batches_until(p) if unit == "row" else p for unit, p in placed]

    def shown(unit: str, position: int) -> str:
        return f"batch {position}" if unit == "batch" else f"{position} rows"

    shape = spec["schedule"]
    if shape == "constant":
        return MaskingSchedule((float(spec["value"]),))
    if shape == "linear":
        unit, (first, last) = positions(
            {"t_start": spec.get("t_start", "0ba"), "t_end": spec.get("t_end", "1dur")}
        )
        if first > last:
            raise ConfigError(
                f"{key}.t_start: comes after t_end ({shown(unit, first)} > {shown(unit, last)})"
            )
        return MaskingSchedule((float(spec["start"]), float(spec["end"])), (first, last), "linear", unit)
    unit, milestones = positions({f"milestones.{i}": text for i, text in enumerate(spec["milestones"])})
    for i in range(1, len(milestones)):
        if milestones[i] < milestones[i - 1]:
            ahead = f"{shown(unit, milestones[i])} < {shown(unit, milestones[i - 1])}"
            raise ConfigError(f"{key}.milestones.{i}: comes before the milestone ahead of it ({ahead})")
    return MaskingSchedule(tuple(float(v) for v in spec["values"]), tuple(milestones), "step", unit)


def device_microbatch_size(config: TrainConfig) -> int:
    return config.device_train_microbatch_size or config.global_train_batch_size // dist.get_world_size()
