"""`make eval`: an embedded task fine-tuned from a pretrained encoder and from the same architecture's random
initialisation, over three seeds; both scores go to one eval.json.

    python -m modernbert_train.finetune.embedded_eval MODEL_DIR [--task keyword|package] --output eval.json

`keyword` (the default, keyword_task): which of 14 keywords was masked out of a line of code, given its
context. `package` (stdlib_task): which of 8 standard-library packages a snippet comes from; a fresh model
learns it from the snippets' names as well as a pretrained one does, so it measures little of pretraining.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

from modernbert_train import storage
from modernbert_train.cli_parser import OneLineErrorParser
from modernbert_train.hf import HFCheckpointError, read_hf_config

from . import keyword_task, stdlib_task
from .data import FinetuneError
from .train import FinetuneSettings, finetune, load_tokenizer

METRIC = "accuracy"
# A clear win: the pretrained mean above random init's by more than twice the noise of the difference (the
# seeds' spread of both), and by at least this much whatever the spread.
MIN_MARGIN = 0.05
# One setting for both starts, so that only the initial weights differ. 128 tokens: the default run's
# sequence length, the positions its attention was trained on.
SETTINGS = dict(seeds=[0, 1, 2], lr=1e-3, epochs=5, batch_size=32, max_length=128)


TASKS = {
    "keyword": (
        f"which of {len(keyword_task.KEYWORDS)} Python keywords was masked out of a line of code, given the "
        f"{keyword_task.CONTEXT_BEFORE} lines before it and the one after"
    ),
    "package": f"which of {len(stdlib_task.PACKAGES)} standard-library packages a 12-line snippet comes from",
}


def build_task(name: str, model_dir: Path, folder: Path) -> dict[str, Path]:
    if name == "package":
        return stdlib_task.build_task(folder)
    config = read_hf_config(model_dir)
    mask_token = load_tokenizer(model_dir).id_to_token(config.mask_token_id)
    if mask_token is None:
        raise FinetuneError(
            f"{model_dir}: the tokenizer has no token for mask_token_id {config.mask_token_id}"
        )
    return keyword_task.build_task(folder, mask_token=mask_token)


def _local_output(text: str) -> Path:
    """--output: a local file: the task's files and runs are written beside it (OUTPUT without .json)."""
    if storage.is_uri(text):
        raise argparse.ArgumentTypeError(
            f"{text}: a local file (the task's work folder is written beside it)"
        )
    return Path(storage.expand_home(text))


def evaluate(
    model_dir: Path, output: Path, task_name: str = "keyword", settings: dict | None = None, shown: str = ""
) -> dict:
    settings = {**SETTINGS, **(settings or {})}
    work = output.with_suffix("")  # runs/default/eval.json -> runs/default/eval/ for the task and runs
    task = build_task(task_name, model_dir, work / f"task-{task_name}")
    start = time.perf_counter()
    scores = {}
    for name, random_init in (("pretrained", False), ("random_init", True)):
        start_settings = FinetuneSettings(**settings, random_init=random_init)
        results = finetune(
            model_dir, task["train"], task["eval"], work / f"{task_name}-{name}", start_settings
        )
        scores[name] = results["final"]
    pretrained, random_init = scores["pretrained"][METRIC], scores["random_init"][METRIC]
    margin = pretrained["mean"] - random_init["mean"]
    needed = max(MIN_MARGIN, 2 * math.hypot(pretrained["std"], random_init["std"]))
    summary = {
        "task": task_name,
        "description": TASKS[task_name],
        "metric": METRIC,
        "pretrained": scores["pretrained"][METRIC]["mean"],
        "random_init": scores["random_init"][METRIC]["mean"],
        "std": {name: scores[name][METRIC]["std"] for name in scores},
        "margin": margin,
        "margin_needed": needed,
        "clear_win": margin > needed,
        "scores": scores,
        "settings": settings,
        "model": shown or str(model_dir),
        "seconds": time.perf_counter() - start,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m modernbert_train.finetune.embedded_eval")
    parser.add_argument(
        "model_dir", help="a transformers ModernBERT folder (runs/default/hf), or its URI (fetched first)"
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="keyword", help="the embedded task")
    parser.add_argument(
        "--output", type=_local_output, default=Path("runs/default/eval.json"), help="a local file"
    )
    args = parser.parse_args(argv)
    try:
        with storage.local_folder(args.model_dir) as model_dir:
            summary = evaluate(model_dir, args.output, args.task, shown=storage.display(args.model_dir))
    except FileNotFoundError:
        print(f"embedded_eval: error: {args.model_dir}: nothing there", file=sys.stderr)
        sys.exit(2)
    except (FinetuneError, HFCheckpointError, storage.StorageError) as error:
        print(f"embedded_eval: error: {error}", file=sys.stderr)
        sys.exit(2)
    pretrained, random_init, std = summary["pretrained"], summary["random_init"], summary["std"]
    print(
        f"wrote {args.output}: {METRIC} pretrained {pretrained:.4f} ± {std['pretrained']:.4f}, "
        f"random init {random_init:.4f} ± {std['random_init']:.4f} ({summary['seconds']:.0f} s)"
    )
    if not summary["clear_win"]:
        # The point of pretraining, not met: loud, so make eval fails (scores are in the file all the same).
        print(
            f"embedded_eval: error: pretraining did not clearly help: {pretrained:.4f} vs random init "
            f"{random_init:.4f}, a margin of {summary['margin']:+.4f} where "
            f"{summary['margin_needed']:.4f} is needed (train longer, or check the run's eval loss)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
