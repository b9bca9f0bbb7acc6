"""`modernbert-finetune MODEL_DIR --train FILE --eval FILE --output DIR`: fine-tune an exported encoder on
labelled JSONL/CSV/TSV data over one or more seeds; scores per epoch go to DIR/results.json."""

import argparse
import math
import sys

from modernbert_train import storage
from modernbert_train.cli_parser import OneLineErrorParser
from modernbert_train.hf import HFCheckpointError
from modernbert_train.model import ModelConfigError

from .data import FinetuneError
from .train import FinetuneSettings, finetune


def parser() -> argparse.ArgumentParser:
    defaults = FinetuneSettings()
    description = " ".join(__doc__.split("\n\n")[0].split())  # the first paragraph, whole
    p = OneLineErrorParser(prog="modernbert-finetune", description=description)
    p.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="a transformers ModernBERT folder with tokenizer.json (local or a URI)",
    )
    p.add_argument("--train", required=True, metavar="FILE", help="training examples (.jsonl, .csv or .tsv)")
    p.add_argument("--eval", required=True, metavar="FILE", help="examples scored after every epoch")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for results.json")
    p.add_argument("--task", choices=("classification", "regression"), default=defaults.task)
    p.add_argument("--text-field", default=defaults.text_field)
    p.add_argument("--text-pair-field", dest="pair_field", help="second text of sentence-pair tasks")
    p.add_argument("--label-field", default=defaults.label_field)
    p.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds, help="one fine-tuning run each")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per example")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    p.add_argument("--dropout", type=float, default=defaults.dropout, help="before the classifier")
    p.add_argument("--device", default=defaults.device, help="auto (a GPU when there is one), cpu or cuda")
    p.add_argument(
        "--random-init", action="store_true", help="MODEL_DIR's architecture with fresh weights (a baseline)"
    )
    return p


def cli(argv: list[str] | None = None) -> None:
    args = vars(parser().parse_args(sys.argv[1:] if argv is None else argv))
    paths = {key: args.pop(key) for key in ("model_dir", "train", "eval", "output")}
    try:
        results = finetune(
            paths["model_dir"], paths["train"], paths["eval"], paths["output"], FinetuneSettings(**args)
        )
    except (FinetuneError, HFCheckpointError, ModelConfigError, storage.StorageError) as error:
        print(f"modernbert-finetune: error: {error}", file=sys.stderr)
        sys.exit(2)
    final = results["final"]
    scores = ", ".join(f"{name} {s['mean']:.4f} ± {s['std']:.4f}" for name, s in final.items())
    collapsed = [name for name, s in final.items() if math.isnan(s["mean"])]
    note = (
        f"; {' and '.join(collapsed)} nan: a seed's predictions (or the --eval labels) were all equal, "
        "which has no correlation (a collapsed regressor)"
        if collapsed
        else ""
    )
    written = storage.join(paths["output"], "results.json")
    print(f"wrote {written}: {scores} ({len(results['runs'])} seed(s)){note}")


if __name__ == "__main__":
    cli()
