"""`modernbert-export CHECKPOINT OUT_DIR`: a Composer checkpoint -> a transformers ModernBERT folder.

The checkpoint carries its model config and tokenizer (RunMetadata), so no recipe is needed. An export
refuses a target folder holding anything but an earlier export (unless overwritten on purpose) and is
written beside it, then swapped in: a failed export leaves the target as it was.
"""

import glob
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from composer.utils import dist
from tokenizers import Tokenizer
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from modernbert_train import storage
from modernbert_train.cli_parser import OneLineErrorParser
from modernbert_train.data.tokens import tokenizer_identity
from modernbert_train.hf import to_hf
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.train.checkpoint import (
    CheckpointError,
    is_sharded_checkpoint,
    model_weights,
    read_checkpoint,
)
from modernbert_train.train.run_metadata import metadata_from_checkpoint

# What an export writes (to_hf: the weights, config.json, and the tokenizer saved through transformers).
EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json"}  # fmt: skip
# What marks a folder as a transformers model: nothing left to export.
TRANSFORMERS_FILES = ("config.json", "model.safetensors")


class ExportTargetError(ValueError):
    """An export folder that must not be written; the message is one line naming it."""


def check_export_target(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or (unless `overwrite`) a folder holding anything but an export;
    local or in a bucket."""
    remote = storage.is_uri(out_dir)
    if remote:
        if storage.exists(out_dir):
            raise ExportTargetError(f"export target {out_dir} is a file, not a folder")
        names = storage.list_files(out_dir)
    else:
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise ExportTargetError(f"export target {out} is a file, not a folder")
        # The export is staged beside the target: its parent must be a folder this process can write into.
        if (problem := storage.why_not_creatable(out)) is not None:
            raise ExportTargetError(f"export target {out} cannot be written: {problem}")
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if overwrite or not names:
        return
    foreign = [name for name in names if name not in EXPORT_FILES]
    if not foreign and "config.json" in names:
        config = storage.join(out_dir, "config.json")
        try:
            if json.loads(storage.read_text(config)).get("model_type") == "modernbert":
                return
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
        foreign = ["config.json"]
    if foreign:
        raise ExportTargetError(
            f"export target {out_dir} is not empty and not an earlier export (it holds {foreign[0]}); "
            f"choose another folder or empty it (modernbert-export --overwrite replaces it)"
        )


@contextmanager
def staged_export(out_dir: str | Path) -> Iterator[Path | str]:
    """A folder to write the export to, swapped in for `out_dir` once complete. A bucket has no rename:
    an earlier export's config.json (what marks an export finished) is deleted first, to_hf uploads the
    folder whole with config.json last, and what an earlier, overwritten content left beside the export is
    deleted after. An upload cut short leaves no config.json: not taken for a finished export."""
    if storage.is_uri(out_dir):
        marker = storage.join(out_dir, "config.json")
        if storage.exists(marker) and storage.removable(marker):
            storage.remove(marker)
        yield out_dir
        leftovers = [name for name in storage.list_files(out_dir) if name not in EXPORT_FILES]
        try:
            for name in leftovers:
                storage.remove(storage.join(out_dir, name))
        except storage.StorageError as error:  # schemes other than s3:// cannot delete here
            print(f"modernbert-export: warning: {error}; delete the earlier content by hand", file=sys.stderr)
        return
    out = Path(out_dir)
    _remove_stale_copies(out)
    hidden = [out.with_name(f".{out.name}.{what}-{os.getpid()}") for what in ("staging", "old")]
    with storage.staged_folder(out, *hidden) as staging:
        yield staging


def _remove_stale_copies(out: Path) -> None:
    """What an export killed here left beside `out` (named with a pid no process has now): its half-written
    staging copy (gigabytes for a large model; a rerun, with another pid, never reused it) is deleted; its
    old copy only once `out` is a finished export (killed mid-swap, it is the previous export's only copy)."""
    prefix = f".{out.name}."
    for sibling in out.parent.glob(f"{glob.escape(prefix)}*-*") if out.parent.is_dir() else ():
        what, _, pid = sibling.name.removeprefix(prefix).rpartition("-")
        if what not in ("staging", "old") or not pid.isdigit() or _process_runs(int(pid)):
            continue
        if what == "old" and not (out / "config.json").is_file():
            continue
        shutil.rmtree(sibling, ignore_errors=True)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def export_checkpoint(
    checkpoint_path: str | Path, out_dir: str | Path, tokenizer: str | None = None, overwrite: bool = False
) -> Path | str:
    """Either path may be a URI: the checkpoint is fetched, the folder uploaded."""
    check_export_target(out_dir, overwrite)
    checkpoint = read_checkpoint_at(checkpoint_path)
    metadata = metadata_from_checkpoint(checkpoint)
    if not metadata or "model_config" not in metadata:
        raise CheckpointError(
            f"checkpoint {checkpoint_path} has no model config (not written by modernbert-train)"
        )
    model = ModernBertForMaskedLM(ModernBertConfig.from_dict(metadata["model_config"]))
    load_weights(model, model_weights(checkpoint), checkpoint_path)
    if tokenizer is not None and metadata.get("tokenizer_json"):
        check_same_tokenizer(tokenizer, metadata["tokenizer_json"], checkpoint_path)
    if tokenizer is None and metadata.get("tokenizer_json"):
        tokenizer = Tokenizer.from_str(metadata["tokenizer_json"])
    with staged_export(out_dir) as staging:
        to_hf(model, staging, tokenizer)
    return out_dir


def read_checkpoint_at(path: str | Path) -> dict:
    """The Composer checkpoint at `path` (local or a URI); a transformers model folder, where a checkpoint
    was expected, is named as one."""
    if is_transformers_folder(path):
        raise CheckpointError(
            f"checkpoint {path} is already a transformers model folder (config.json, model.safetensors): "
            "nothing to export; load it with from_pretrained, or give a Composer checkpoint"
        )
    # A bucket's checkpoint is fetched, read, then dropped: a file, or a sharded one's folder (a prefix).
    sharded = storage.is_uri(path) and is_sharded_checkpoint(path)
    try:
        with (storage.local_folder if sharded else storage.local_file)(path) as local:
            return read_checkpoint(local)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except CheckpointError as error:  # named by its URI, not the download's
        raise CheckpointError(str(error).replace(str(local), str(path))) from None


def is_transformers_folder(path: str | Path) -> bool:
    """A folder (local, or a URI prefix that is no object itself) holding what to_hf writes."""
    if storage.is_uri(path):
        if storage.exists(path):
            return False
        return all(storage.exists(storage.join(path, name)) for name in TRANSFORMERS_FILES)
    return Path(path).is_dir() and all(Path(path, name).is_file() for name in TRANSFORMERS_FILES)


def check_same_tokenizer(tokenizer: str, trained_with: str, checkpoint_path: str | Path) -> None:
    """`--tokenizer` may ship another file of the tokenizer the checkpoint was trained with (other
    formatting, say), never another tokenizer: its ids would name other tokens. Compared by content."""
    file = storage.file_in(tokenizer, "tokenizer.json")
    try:
        given = tokenizer_identity(storage.read_text(file))
    except FileNotFoundError:
        raise CheckpointError(f"--tokenizer {tokenizer}: {file} does not exist") from None
    except storage.StorageError as error:  # a bucket's error, named by its URI
        raise CheckpointError(f"--tokenizer {tokenizer}: {error}") from None
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "not a tokenizer.json"
        raise CheckpointError(f"--tokenizer {tokenizer}: {reason}") from None
    if given != tokenizer_identity(trained_with):
        raise CheckpointError(
            f"--tokenizer {tokenizer}: not the tokenizer checkpoint {checkpoint_path} was trained with (its "
            "vocabulary or special tokens differ); leave --tokenizer out to ship the checkpoint's own"
        )


def load_weights(model: ModernBertForMaskedLM, weights: dict, checkpoint_path: str | Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # torch lists every missing, unexpected and misshapen key
        first = str(error).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"checkpoint {checkpoint_path}: its weights do not fit its model config ({first})"
        ) from None


def export_trainer_model(composer_model, out_dir: str | Path, tokenizer_file: str | Path) -> None:
    """Export at the end of training: gathers full weights on every rank (FSDP needs all), rank 0 writes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(composer_model.model, options=options)
    if dist.get_global_rank() == 0:
        model = ModernBertForMaskedLM(composer_model.config)
        model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()})
        with staged_export(out_dir) as staging:
            to_hf(model, staging, str(tokenizer_file))
    dist.barrier()


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--average" in argv:  # modernbert-export --average CKPT [CKPT ...] OUT_DIR
        from modernbert_train.train.average import average_cli  # it builds on this module

        average_cli(argv)
        return
    parser = OneLineErrorParser(
        prog="modernbert-export",
        description=__doc__.splitlines()[0],
        epilog="modernbert-export --average CKPT [CKPT ...] OUT_DIR averages checkpoints into one folder "
        "(modernbert-export --average --help)",
    )
    parser.add_argument(
        "checkpoint", help="a Composer checkpoint written by modernbert-train (.pt, or a sharded folder)"
    )
    parser.add_argument("out_dir", help="folder to write config.json, model.safetensors and the tokenizer to")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json (or a folder or URI holding one) to ship instead of the checkpoint's own copy",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR even when it holds something else"
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer, args.overwrite)
    except ValueError as e:
        print(f"modernbert-export: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"modernbert-export: error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out}")


def os_error_line(error: OSError) -> str:
    """A full disk, a read-only or unreadable place, in one line naming it; the target was left as it was."""
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}; the export target was left as it was"


if __name__ == "__main__":
    cli()
