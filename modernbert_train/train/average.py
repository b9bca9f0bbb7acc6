"""`modernbert-export --average CKPT [CKPT ...] OUT_DIR`: the uniform average of several checkpoints' model
weights (checkpoint averaging: LAWA, model soups) as one transformers ModernBERT folder. Checkpoints and
the folder may be local or URIs.

Checkpoints are read one at a time and summed in float64, so memory does not grow with N and the average is
exact to the weights' own precision. They must be distinct files, share the model config and the tokenizer
(as `tokenizer_identity` compares them); `--tokenizer` may ship another file of that tokenizer, never another.
"""

import os
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from modernbert_train import storage
from modernbert_train.cli_parser import OneLineErrorParser
from modernbert_train.data.tokens import tokenizer_identity
from modernbert_train.hf import to_hf
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.train.checkpoint import CheckpointError, model_weights
from modernbert_train.train.export import (
    check_export_target,
    check_same_tokenizer,
    load_weights,
    os_error_line,
    read_checkpoint_at,
    staged_export,
)
from modernbert_train.train.run_metadata import metadata_from_checkpoint


def model_config_of(path: str | Path, checkpoint: dict) -> dict:
    metadata = metadata_from_checkpoint(checkpoint)
    if not metadata or "model_config" not in metadata:
        raise CheckpointError(f"checkpoint {path} has no model config (not written by modernbert-train)")
    # The attention backend is how the weights were run, not what they are.
    return {k: v for k, v in metadata["model_config"].items() if k != "attn_backend"}


def average_checkpoints(paths: list[str | Path]) -> tuple[ModernBertForMaskedLM, str | None]:
    """The averaged model and the first checkpoint's tokenizer.json text."""
    check_distinct(paths)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    model = first_config = tokenizer_json = None
    for path in paths:
        checkpoint = read_checkpoint_at(path)
        config = model_config_of(path, checkpoint)
        weights = model_weights(checkpoint)
        if model is None:
            first_config, tokenizer_json = config, metadata_from_checkpoint(checkpoint).get("tokenizer_json")
            model = ModernBertForMaskedLM(ModernBertConfig.from_dict(first_config))
        differing = sorted(
            k for k in first_config.keys() | config.keys() if first_config.get(k) != config.get(k)
        )
        if differing:
            key = differing[0]
            raise CheckpointError(
                f"checkpoint {path} has model {key}={config.get(key)!r}, but {paths[0]} has "
                f"{first_config.get(key)!r}: only checkpoints of one model can be averaged"
            )
        tokenizer_here = metadata_from_checkpoint(checkpoint).get("tokenizer_json")
        if (
            tokenizer_json
            and tokenizer_here
            and tokenizer_identity(tokenizer_here) != tokenizer_identity(tokenizer_json)
        ):
            raise CheckpointError(
                f"checkpoint {path} was trained with another tokenizer than {paths[0]}: the same ids mean "
                "other tokens, so their weights cannot be averaged"
            )
        # Every checkpoint must fit the (shared) config, names and shapes, as a single export requires.
        load_weights(model, weights, path)
        if not total:
            dtypes = {key: value.dtype for key, value in weights.items()}
            total = {key: value.to(torch.float64) for key, value in weights.items()}
        else:
            for key, value in weights.items():
                total[key] += value.to(torch.float64)
        del checkpoint, weights
    load_weights(model, {key: (value / len(paths)).to(dtypes[key]) for key, value in total.items()}, paths[0])
    return model, tokenizer_json


def check_distinct(paths: list[str | Path]) -> None:
    """One checkpoint given twice (a glob matching a file and the `latest-rank0.pt` link to it, say) would
    silently weigh double: refused. Local paths are compared resolved (links, `..`), URIs as written."""
    seen: dict[str, str | Path] = {}
    for path in paths:
        key = str(path) if storage.is_uri(path) else os.path.realpath(path)
        if key in seen:
            links = [p for p in (seen[key], path) if not storage.is_uri(p) and Path(p).is_symlink()]
            why = f" ({links[0]} is a link to {key})" if links else ""
            raise CheckpointError(
                f"checkpoints {seen[key]} and {path} are the same checkpoint{why}: give each one once"
            )
        seen[key] = path


def average_cli(argv: list[str]) -> None:
    parser = OneLineErrorParser(
        prog="modernbert-export",
        usage="modernbert-export --average CKPT [CKPT ...] OUT_DIR [--tokenizer FILE] [--overwrite]",
        description=" ".join(__doc__.split("\n\n")[0].split()),  # the first paragraph, whole
    )
    parser.add_argument("--average", action="store_true", required=True)
    parser.add_argument(
        "paths", nargs="+", metavar="CKPT... OUT_DIR",
        help="checkpoints (.pt files or sharded checkpoint folders), then the output folder",
    )  # fmt: skip
    parser.add_argument("--tokenizer", help="tokenizer.json to ship instead of the first checkpoint's")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR even when it holds something else"
    )
    args = parser.parse_args(argv)
    if len(args.paths) < 3:
        print("modernbert-export: error: --average needs at least two checkpoints and the output folder",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    *checkpoints, out_dir = args.paths
    try:
        check_export_target(out_dir, args.overwrite)
        model, tokenizer_json = average_checkpoints(checkpoints)
        if args.tokenizer and tokenizer_json:
            check_same_tokenizer(args.tokenizer, tokenizer_json, checkpoints[0])
        tokenizer = args.tokenizer or (Tokenizer.from_str(tokenizer_json) if tokenizer_json else None)
        with staged_export(out_dir) as staging:
            to_hf(model, staging, tokenizer)
    except ValueError as e:
        print(f"modernbert-export: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"modernbert-export: error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out_dir}: the average of {len(checkpoints)} checkpoints")
