"""`make eval`: an embedded task fine-tuned from a pretrained encoder and from the same architecture's random
initialisation, over three seeds; both scores go to one eval.json.

    python -m modernbert_train.finetune.embedded_eval MODEL_DIR [--task keyword|package] --output eval.json

`keyword` (the default, keyword_task): which of 14 keywords was masked out of a line of code, given its
context. `package` (stdlib_task): which of 8 standard-library packages a snippet comes from; a fresh model
learns it from the snippets' names as well as a pretrained one does, so it measures little of pretraining.
"""

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

from modernbert_train import storage
from modernbert_train.cli_parser import OneLineErrorParser
from modernbert_train.hf import HFCheckpointError, read_hf_config
from modernbert_train.model import ModelConfigError

from . import keyword_task, stdlib_task
from .data import FinetuneError
from .train import FinetuneSettings, finetune, json_text, load_tokenizer

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


def mask_token(model_dir: Path) -> str:
    """The model's mask token, its tokenizer checked against its config (vocabulary size included) before
    any task is built or trained on."""
    config = read_hf_config(model_dir)
    token = load_tokenizer(model_dir, config).id_to_token(config.mask_token_id)
    if token is None:
        raise FinetuneError(
            f"{model_dir}: the tokenizer has no token for mask_token_id {config.mask_token_id}"
        )
    return token


def build_task(name: str, mask: str, folder: Path) -> dict[str, Path]:
    if name == "package":
        return stdlib_task.build_task(folder)
    return keyword_task.build_task(folder, mask_token=mask)


def check_output(output: Path, model_dir: str | Path | None = None) -> Path:
    """--output, checked before any work: a file to write (replacing an earlier one), with the task's work
    folder (OUTPUT without its suffix) beside it, neither in a local `model_dir` (a folder meant to be
    handed on as it is). Returns the work folder."""
    work = output.with_suffix("")  # runs/default/eval.json -> runs/default/eval/ for the task and runs
    if model_dir is not None and not storage.is_uri(model_dir):
        model = Path(model_dir).resolve()
        if model == work.resolve() or model in work.resolve().parents:
            raise FinetuneError(
                f"--output {output}: its work folder {work} would write the task and its runs into the "
                f"model folder {model_dir}; name a file outside it, such as runs/default/eval.json"
            )
    if output.is_dir():
        raise FinetuneError(f"--output {output}: is a folder; name a file for the scores, such as eval.json")
    if work == output:
        raise FinetuneError(
            f"--output {output}: needs a suffix such as .json (the work folder is OUTPUT without it)"
        )
    if (problem := storage.why_not_creatable(output)) is not None:
        raise FinetuneError(f"--output {output}: cannot create it: {problem}")
    if work.exists() and not work.is_dir():
        raise FinetuneError(f"--output {output}: its work folder {work} is a file")
    return work


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
    FinetuneSettings(**settings).check()
    work = check_output(output, model_dir)
    mask = mask_token(model_dir)
    start = time.perf_counter()
    scores = {}
    new_work = not work.exists()
    try:
        task = build_task(task_name, mask, work / f"task-{task_name}")
        for name, random_init in (("pretrained", False), ("random_init", True)):
            start_settings = FinetuneSettings(**settings, random_init=random_init)
            results = finetune(
                model_dir, task["train"], task["eval"], work / f"{task_name}-{name}", start_settings
            )
            scores[name] = results["final"]
    except BaseException:
        if new_work:  # a failed run leaves no half-built work folder behind
            shutil.rmtree(work, ignore_errors=True)
        raise
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
    storage.write_text(output, json_text(summary))  # whole: staged beside it, then renamed into place
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
        check_output(args.output, args.model_dir)  # before a model URI is fetched (evaluate checks it again)
        with storage.local_folder(args.model_dir) as model_dir:
            summary = evaluate(model_dir, args.output, args.task, shown=storage.display(args.model_dir))
    except (FinetuneError, HFCheckpointError, ModelConfigError, storage.StorageError) as error:
        print(f"embedded_eval: error: {error}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as error:  # a model URI with nothing there, or a file gone mid-run
        print(f"embedded_eval: error: {error.filename or error}: nothing there", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a full disk, a permission taken away mid-run
        print(f"embedded_eval: error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
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
