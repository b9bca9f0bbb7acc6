"""`make eval`: the embedded task (stdlib_task) fine-tuned from a pretrained encoder and from the same
architecture's random initialisation, over three seeds; both scores go to one eval.json.

    python -m modernbert_train.finetune.embedded_eval MODEL_DIR --output runs/default/eval.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

from modernbert_train.hf import HFCheckpointError

from .data import FinetuneError
from .stdlib_task import PACKAGES, build_task
from .train import FinetuneSettings, finetune

METRIC = "accuracy"
# One setting for both starts, so that only the initial weights differ. 128 tokens: the default run's
# sequence length, the positions its attention was trained on.
SETTINGS = dict(seeds=[0, 1, 2], lr=1e-3, epochs=5, batch_size=32, max_length=128)


def evaluate(model_dir: Path, output: Path) -> dict:
    work = output.with_suffix("")  # runs/default/eval.json -> runs/default/eval/ for the task and runs
    task = build_task(work / "task")
    start = time.perf_counter()
    scores = {}
    for name, random_init in (("pretrained", False), ("random_init", True)):
        settings = FinetuneSettings(**SETTINGS, random_init=random_init)
        results = finetune(model_dir, task["train"], task["eval"], work / name, settings)
        scores[name] = results["final"]
    summary = {
        "task": f"which of {len(PACKAGES)} standard-library packages a 12-line snippet of Python comes from",
        "metric": METRIC,
        "pretrained": scores["pretrained"][METRIC]["mean"],
        "random_init": scores["random_init"][METRIC]["mean"],
        "std": {name: scores[name][METRIC]["std"] for name in scores},
        "scores": scores,
        "settings": SETTINGS,
        "model": str(model_dir),
        "seconds": time.perf_counter() - start,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modernbert_train.finetune.embedded_eval")
    parser.add_argument("model_dir", type=Path, help="a transformers ModernBERT folder (runs/default/hf)")
    parser.add_argument("--output", type=Path, default=Path("runs/default/eval.json"))
    args = parser.parse_args(argv)
    try:
        summary = evaluate(args.model_dir, args.output)
    except (FinetuneError, HFCheckpointError) as error:
        print(f"embedded_eval: error: {error}", file=sys.stderr)
        sys.exit(2)
    pretrained, random_init, std = summary["pretrained"], summary["random_init"], summary["std"]
    print(
        f"wrote {args.output}: {METRIC} pretrained {pretrained:.4f} ± {std['pretrained']:.4f}, "
        f"random init {random_init:.4f} ± {std['random_init']:.4f} ({summary['seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
