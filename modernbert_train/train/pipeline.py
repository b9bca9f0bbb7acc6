"""`modernbert-pipeline PIPELINE.yaml [key=value ...]`: the phases of a run (pretraining, context extension,
decay) in order, as one command; also `composer -n N -m modernbert_train.train.pipeline PIPELINE.yaml`.

PIPELINE.yaml lists the phases' recipes (paths relative to it), each with optional overrides:

    phases:
      - pretrain.yaml
      - recipe: context_extension.yaml
        overrides: [data.num_workers=4]

Each phase autoresumes in its own save_folder, where its resolved config.yaml and metrics.jsonl stay apart
from the other phases'. Every phase after the first starts from the previous phase's final checkpoint
(load_path, reset_time: weights and optimizer moments carry over; schedule, data and hyperparameters are its
own recipe's). Command-line overrides apply to every phase. Rerunning the command after a crash skips the
finished phases (their checkpoints already reached max_duration) and resumes the one that was running.
Exit status as modernbert-train's, from the first phase that does not finish.
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from modernbert_train import storage
from modernbert_train.cli_parser import OneLineErrorParser
from modernbert_train.train.config import ConfigError, load_config


@dataclass(frozen=True)
class Phase:
    recipe: Path
    overrides: list[str]  # the phase's own, the command line's, then the chaining ones
    save_folder: str


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> list[Phase]:
    """Every phase's recipe and overrides, each checked as modernbert-train would check it (ConfigError)."""
    path = Path(path)
    try:
        document = yaml.safe_load(storage.decode_text(path.read_bytes(), path))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the pipeline: {e.strerror}") from None
    except storage.StorageError as e:  # not UTF-8: names the line and the byte
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML: {str(e).splitlines()[0]}") from None
    entries = document.get("phases") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected 'phases:', a list of recipes (or {{recipe, overrides}})")
    unknown = sorted(set(document) - {"phases"})
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (a pipeline has only 'phases')")
    phases: list[Phase] = []
    for i, entry in enumerate(entries):
        where = f"{path}: phases.{i}"
        entry = {"recipe": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("recipe"), str):
            raise ConfigError(f"{where}: expected a recipe path, or {{recipe: PATH, overrides: [key=value]}}")
        if set(entry) - {"recipe", "overrides"}:
            raise ConfigError(f"{where}: unknown key '{sorted(set(entry) - {'recipe', 'overrides'})[0]}'")
        own = entry.get("overrides", [])
        if not isinstance(own, list) or not all(isinstance(o, str) for o in own):
            raise ConfigError(f"{where}.overrides: expected a list of key=value strings")
        recipe = path.parent / entry["recipe"]
        if not recipe.is_file():
            raise ConfigError(f"{where}.recipe: no recipe at {recipe}")
        chain = ["autoresume=true"]
        if phases:
            previous = phases[-1].save_folder
            # The previous phase's save_folder: its newest checkpoint (start._checkpoint_to_load).
            chain += [f"load_path={previous}", "reset_time=true"]
            chain += ["load_weights_only=false"]
        phase_overrides = [*own, *overrides, *chain]
        config = load_config(recipe, phase_overrides)
        if not config.save_folder:
            raise ConfigError(f"{where}: {recipe} has no save_folder (each phase keeps its own)")
        taken = [j for j, phase in enumerate(phases) if phase.save_folder == config.save_folder]
        if taken:
            raise ConfigError(
                f"{where}: save_folder {config.save_folder} is phase {taken[0]}'s too: one each"
            )
        phases.append(Phase(recipe, phase_overrides, config.save_folder))
    return phases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        prog="modernbert-pipeline",
        description="Run a recipe's phases (pretrain, context extension, decay) in order, resumably.",
        epilog="example: modernbert-pipeline yamls/modernbert-base/pipeline.yaml",
    )
    parser.add_argument("pipeline", help="YAML listing the phases' recipes")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every phase")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        phases = load_pipeline(args.pipeline, args.overrides)
    except ConfigError as e:
        print(f"modernbert-pipeline: error: {e}", file=sys.stderr)
        sys.exit(2)
    from composer.utils import dist

    from modernbert_train.train.main import main as train

    for i, phase in enumerate(phases, start=1):
        if dist.get_global_rank() == 0:
            print(
                f"modernbert-pipeline: phase {i}/{len(phases)}: {phase.recipe} in {phase.save_folder}",
                flush=True,
            )
        try:
            train([str(phase.recipe), *phase.overrides])
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
    if dist.get_global_rank() == 0:
        print(f"modernbert-pipeline: all {len(phases)} phases complete")


def cli() -> None:
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
