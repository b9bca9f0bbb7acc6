"""Reading Composer checkpoints (whole, or just their clock), one-line explanations of why one cannot be
loaded, and what a phase change keeps of one.

Composer checkpoints are pickles (`torch.load(weights_only=False)`): load only your own. Weights from
elsewhere come in through `modernbert_train.hf.from_hf` (safetensors).
"""

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from composer.core import Callback, State
from composer.loggers import Logger
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from modernbert_train import storage
from modernbert_train.data.tokens import tokenizer_identity
from modernbert_train.model import ModernBertConfig
from modernbert_train.train.run_metadata import RunMetadata, decode, metadata_from_checkpoint

# Config fields that change no weight shape: a checkpoint loads fine across them (phase changes).
SHAPE_FREE_FIELDS = {
    "global_rope_theta",
    "local_rope_theta",
    "local_attention",
    "global_attn_every_n_layers",
    "attn_backend",
    "max_position_embeddings",
    "attention_dropout",
    "embedding_dropout",
    "mlp_dropout",
    "initializer_range",
    "initializer_cutoff_factor",
    "norm_eps",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A whole checkpoint file, or of a sharded checkpoint folder what export and averaging read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return read_sharded_weights(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated or not a checkpoint): {reason}"
        ) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint.get("state", {}):
        raise CheckpointError(f"checkpoint {path} is not a Composer checkpoint (no state/model)")
    return checkpoint


# The training clock's counters, as Composer's Timestamp saves them; max_duration counts one of these.
CLOCK_COUNTERS = ("epoch", "batch", "sample", "token")


@dataclass(frozen=True)
class CheckpointSummary:
    """What deciding how a run starts needs of a checkpoint, read without loading its tensors."""

    clock: dict[str, int]  # the training time it was saved at: {"batch": 10, "token": 4934, ...}
    # The recipe of the run that saved it (None: saved before checkpoints kept their recipe).
    recipe: dict[str, Any] | None
    # The tokenizer it was trained with, as `tokenizer_identity` (the parts that decide the ids) names it
    tokenizer_identity: str | None = None
    wandb_run_id: str | None = None  # the W&B run it logged to (None: none, or saved before ids were kept)
    model_config: dict[str, Any] | None = None  # the ModernBertConfig it holds, as a dict (None: not kept)


def checkpoint_clock(path: str | Path) -> dict[str, int]:
    """The training time a checkpoint was saved at (`{"batch": 10, "token": 4934, ...}`)."""
    return checkpoint_summary(path).clock


def checkpoint_summary(path: str | Path) -> CheckpointSummary:
    """A checkpoint's clock and run metadata: a .pt file is memory-mapped, of a sharded one (a folder) only
    these keys are read. One that cannot be read is a one-line CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.is_dir():
            saved = {"state": {"timestamp": {"Timestamp": dict.fromkeys(CLOCK_COUNTERS, 0)}}}
            _load_sharded(saved, path)
            metadata = {"json": ""}
            try:  # a checkpoint saved before the run metadata was one JSON string has none to read here
                _load_sharded({"state": {"callbacks": {RunMetadata.__qualname__: metadata}}}, path)
            except (Exception, CheckpointException):
                metadata = None
            metadata = decode(metadata) if metadata and metadata["json"] else None
        else:
            saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            metadata = metadata_from_checkpoint(saved)
        clock = saved["state"]["timestamp"]["Timestamp"]
        clock = {counter: int(clock[counter]) for counter in CLOCK_COUNTERS}
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated or not a checkpoint): {reason}"
        ) from None
    metadata = metadata or {}
    tokenizer = metadata.get("tokenizer_json")
    return CheckpointSummary(
        clock,
        metadata.get("recipe"),
        tokenizer_identity(tokenizer) if tokenizer else None,
        metadata.get("wandb_run_id"),
        metadata.get("model_config"),
    )


# What `checkpoint_summary` reads of a sharded checkpoint, as torch.distributed.checkpoint names the keys.
SUMMARY_KEYS = ("state.timestamp.", f"state.callbacks.{RunMetadata.__qualname__}.")


def sharded_metadata(folder: str | Path) -> Metadata:
    """The `.metadata` of a sharded checkpoint folder (a pickle too: read only your own)."""
    try:
        return dcp.FileSystemReader(str(folder)).read_metadata()
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {folder} cannot be read (its .metadata): {reason}") from None


def sharded_files(metadata: Metadata) -> dict[str, int]:
    """Every file a sharded checkpoint's metadata refers to (relative to its folder), with the bytes it must
    hold at least (the end of the last value stored in it)."""
    needed: dict[str, int] = {}
    for stored in (metadata.storage_data or {}).values():
        end = stored.offset + stored.length
        needed[stored.relative_path] = max(needed.get(stored.relative_path, 0), end)
    return needed


def sharded_summary_files(metadata: Metadata) -> list[str]:
    """The files of a sharded checkpoint that hold what `checkpoint_summary` reads: its clock and run
    metadata, values every rank has, which torch writes once (Composer has them go to rank 0's file, with
    rank 0's shard of the tensors)."""
    storage_data = metadata.storage_data or {}
    return sorted(
        {stored.relative_path for index, stored in storage_data.items() if index.fqn.startswith(SUMMARY_KEYS)}
    )


def why_incomplete_sharded(files: Mapping[str, int | None], metadata: Metadata | None) -> str | None:
    """Why a sharded checkpoint folder holding `files` (relative names -> sizes in bytes, None where unknown)
    is not whole, or None when it is: its `.metadata` is there (`metadata`, read from it) and so is every file
    it refers to, each with at least the bytes it refers to. Every rank writes its own files, so a save cut
    short (or one rank's upload lost) leaves some missing."""
    if ".metadata" not in files or metadata is None:
        return "is incomplete (no .metadata)"
    for name, needed in sorted(sharded_files(metadata).items()):
        if name not in files:
            return f"is incomplete ({name} is missing; its .metadata refers to it)"
        size = files[name]
        if size is not None and size < needed:
            return f"is incomplete ({name} holds {size} bytes; its .metadata refers to {needed})"
    return None


def read_sharded_weights(folder: Path) -> dict[str, Any]:
    """The model weights and run metadata of a sharded checkpoint folder (FSDP's default), gathered on this
    one process in a whole checkpoint's layout (`{"state": {"model": ..., "callbacks": ...}}`); the optimizer
    state is not read. A folder that is incomplete or unreadable is a one-line CheckpointError."""
    if not (folder / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint {folder} is a folder (a sharded checkpoint) without .metadata: not a checkpoint, or "
            "its save was cut short"
        )
    metadata = sharded_metadata(folder)
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    if (reason := why_incomplete_sharded(sizes, metadata)) is not None:
        raise CheckpointError(f"checkpoint {folder} {reason}")
    prefix = "state.model."
    model = {
        key.removeprefix(prefix): torch.empty(stored.size, dtype=stored.properties.dtype)
        for key, stored in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(stored, TensorStorageMetadata)
    }
    if not model:
        raise CheckpointError(f"checkpoint {folder} is not a Composer checkpoint (no state/model)")
    checkpoint: dict[str, Any] = {"state": {"model": model}}
    if f"state.callbacks.{RunMetadata.__qualname__}.json" in metadata.state_dict_metadata:
        checkpoint["state"]["callbacks"] = {RunMetadata.__qualname__: {"json": ""}}
    try:
        _load_sharded(checkpoint, folder)
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {folder} cannot be read (damaged): {reason}") from None
    return checkpoint


def _load_sharded(state: dict[str, Any], folder: Path) -> None:
    """Fill `state`'s keys from a sharded checkpoint, on this one process."""
    with warnings.catch_warnings():  # one process reads on purpose; torch warns that it does
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)


def model_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ModernBertForMaskedLM's state dict out of a Composer checkpoint of ModernBertMLM."""
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in checkpoint["state"]["model"].items() if k.startswith(prefix)}


def explain_mismatch(
    path: str | Path, model: torch.nn.Module, config: ModernBertConfig, shown: str | None = None
) -> str | None:
    """Why the checkpoint at `path` (a file, or a sharded checkpoint's folder) does not fit `model` (a
    ModernBertForMaskedLM), or None if it does; it is named `shown` (where it was fetched from), else
    `path`. Of a sharded folder only the shapes in its .metadata and its run metadata are read."""
    saved_config, shapes = _saved_model(Path(path))
    path = shown or path
    if saved_config:
        differing = [
            f"{k}={saved_config[k]} there, {v} here"
            for k, v in config.to_dict().items()
            if k not in SHAPE_FREE_FIELDS and k in saved_config and saved_config[k] != v
        ]
        if differing:
            return f"checkpoint {path} holds another model: {'; '.join(differing)}"
    expected = model.state_dict()
    missing = sorted(set(expected) - set(shapes))
    if missing:
        return f"checkpoint {path} lacks weight '{missing[0]}' ({len(missing)} missing in all)"
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        return f"checkpoint {path} has weight '{unexpected[0]}' that this model lacks"
    for name, tensor in expected.items():
        if shapes[name] != list(tensor.shape):
            here = list(tensor.shape)
            return f"checkpoint {path}: weight '{name}' is {shapes[name]} there but {here} in this model"
    return None


def _saved_model(path: Path) -> tuple[dict[str, Any] | None, dict[str, list[int]]]:
    """A checkpoint's model config (None where it kept none) and its weights' shapes, by name."""
    prefix = "state.model.model."
    if not path.is_dir():
        checkpoint = read_checkpoint(path)
        shapes = {name: list(weight.shape) for name, weight in model_weights(checkpoint).items()}
        return (metadata_from_checkpoint(checkpoint) or {}).get("model_config"), shapes
    if not (path / ".metadata").is_file():
        read_sharded_weights(path)  # raises its one-line error
    stored = sharded_metadata(path).state_dict_metadata
    shapes = {
        key.removeprefix(prefix): list(value.size)
        for key, value in stored.items()
        if key.startswith(prefix) and isinstance(value, TensorStorageMetadata)
    }
    return checkpoint_summary(path).model_config, shapes


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a sharded checkpoint's folder (locally, or a bucket prefix that is no object)."""
    if storage.is_uri(path):
        return not storage.exists(path) and bool(storage.list_files(path))
    return Path(path).is_dir()


def why_not_loadable(checkpoint: str | Path, state_dict_type: str | None) -> str | None:
    """Why a run whose `parallelism.fsdp.state_dict_type` is `state_dict_type` (None: no FSDP) cannot load
    `checkpoint`, or None when it can. Composer reads a checkpoint the way this run saves them, not the way
    it was saved: a sharded folder only into a run saving sharded state dicts (on any number of ranks), a
    whole file only into one that does not (DDP, or FSDP with full state dicts). The other way it fails
    mid-start ("Is a directory", "load_path must be a directory")."""
    sharded_here = state_dict_type == "sharded"
    if is_sharded_checkpoint(checkpoint) and not sharded_here:
        return (
            f"checkpoint {checkpoint} is sharded (a folder) and this run loads whole checkpoint files: set "
            "parallelism.fsdp.state_dict_type=sharded to continue it (on any number of ranks), or start a "
            "run without FSDP from its weights (modernbert-export, then model.init_from_hf)"
        )
    if sharded_here and not is_sharded_checkpoint(checkpoint):
        return (
            f"checkpoint {checkpoint} is a whole file and this run loads sharded checkpoints "
            "(parallelism.fsdp.state_dict_type=sharded): set parallelism.fsdp.state_dict_type=full to "
            "continue it (on any number of ranks)"
        )
    return None


# torch-optimi's running bookkeeping in each parameter group: the step count (which also debiases the
# betas), whether the group is set up (False would restart the count at 1 and overwrite the moments with one
# gradient), and the kernel and Kahan choices the saved per-parameter state was laid out for.
OPTIMIZER_RUNNING_KEYS = ("step", "setup", "triton", "kahan_sum")


class PhaseChange(Callback):
    """A new phase (load_path with reset_time): the weights, the optimizer moments and its step count carry
    over; the data stream, the schedule and the optimizer hyperparameters are this recipe's.

    `ignore_keys` is Composer's `load_ignore_keys`. The hyperparameters are put back after the load rather
    than filtered out of it, because a sharded checkpoint's load fills this run's own state dict with every
    saved value.
    """

    def __init__(self):
        self.recipe_groups: list[dict[str, Any]] = []

    def ignore_keys(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state"]
        state.pop("dataset_state", None)
        state.pop("schedulers", None)
        # The callbacks' state (speed window, saved checkpoint list, run metadata) is the old run's; a
        # sharded load would also fail on any metadata key the new recipe adds.
        state.pop("callbacks", None)

    def before_load(self, state: State, logger: Logger) -> None:
        # Here the schedulers have already set each group's starting lr.
        self.recipe_groups = [
            {k: v for k, v in group.items() if k not in ("params", *OPTIMIZER_RUNNING_KEYS)}
            for group in state.optimizers[0].param_groups
        ]

    def after_load(self, state: State, logger: Logger) -> None:
        optimizer = state.optimizers[0]
        for group, recipe in zip(optimizer.param_groups, self.recipe_groups):
            group.update(recipe)
            for param in group["params"]:
                # eps^2 is cached per parameter when its state is created: follow a new eps.
                if "eps_sq" in optimizer.state.get(param, {}):
                    optimizer.state[param]["eps_sq"].fill_(group["eps"] ** 2)
