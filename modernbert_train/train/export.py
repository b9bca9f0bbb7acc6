"""`modernbert-export CHECKPOINT OUT_DIR`: a Composer checkpoint -> a transformers ModernBERT folder.

The checkpoint carries its model config and tokenizer (RunMetadata), so no recipe is needed.
"""

import argparse
import sys
from pathlib import Path

import torch
from composer.utils import dist
from tokenizers import Tokenizer
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from modernbert_train.hf import to_hf
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.train.checkpoint import CheckpointError, model_weights, read_checkpoint
from modernbert_train.train.run_metadata import metadata_from_checkpoint


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, tokenizer: str | None = None) -> Path:
    checkpoint = read_checkpoint(checkpoint_path)
    metadata = metadata_from_checkpoint(checkpoint)
    if not metadata or "model_config" not in metadata:
        raise CheckpointError(
            f"checkpoint {checkpoint_path} has no model config (not written by modernbert-train)"
        )
    model = ModernBertForMaskedLM(ModernBertConfig.from_dict(metadata["model_config"]))
    model.load_state_dict(model_weights(checkpoint))
    if tokenizer is None and metadata.get("tokenizer_json"):
        tokenizer = Tokenizer.from_str(metadata["tokenizer_json"])
    return to_hf(model, out_dir, tokenizer)


def export_trainer_model(composer_model, out_dir: str | Path, tokenizer_file: str | Path) -> None:
    """Export at the end of training: gathers full weights on every rank (FSDP needs all), rank 0 writes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(composer_model.model, options=options)
    if dist.get_global_rank() == 0:
        model = ModernBertForMaskedLM(composer_model.config)
        model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()})
        to_hf(model, out_dir, str(tokenizer_file))
    dist.barrier()


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="modernbert-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Composer checkpoint (.pt) written by modernbert-train")
    parser.add_argument("out_dir", help="folder to write config.json, model.safetensors and the tokenizer to")
    parser.add_argument(
        "--tokenizer", help="tokenizer.json to ship instead of the one stored in the checkpoint"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer)
    except ValueError as e:
        print(f"modernbert-export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli()
