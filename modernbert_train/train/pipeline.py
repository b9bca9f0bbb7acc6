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
finished phases (their checkpoints already reached max_duration) and resumes the one that was running. A
finished phase whose recipe now asks for more (a longer max_duration) while a later phase has already
started from its end is refused (exit 2): the later phase resumes from its own checkpoints, so the extra
training would never reach it.
Exit status as modernbert-train's, from the first phase that does not finish. A SIGTERM that arrives while a
phase finishes (its last batch, final save or export) or between phases stops the pipeline before the next
phase with 75 (rerun the same command); during a phase's setup, before its trainer exists, a SIGTERM ends the
process as it ends modernbert-train.
"""

import argparse
import os
import signal
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
    max_duration: str


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
        phases.append(Phase(recipe, phase_overrides, config.save_folder, config.max_duration))
    return phases


def _checkpoint_names(save_folder: str) -> list[str]:
    """The names of the checkpoints (files or sharded folders) in a phase's save_folder, oldest first."""
    from modernbert_train.train.checkpoint_files import checkpoint_order

    try:
        if storage.is_uri(save_folder):
            tops = {name.partition("/")[0] for name in storage.list_files(save_folder)}
        else:
            tops = set(os.listdir(save_folder)) if os.path.isdir(save_folder) else set()
    except (OSError, storage.StorageError) as e:
        raise ConfigError(f"save_folder {storage.display(save_folder)}: cannot list it: {e}") from None
    names = [top for top in tops if checkpoint_order(Path(top))]
    return sorted(names, key=lambda name: checkpoint_order(Path(name)))


def _unfinished(phase: Phase, newest: str) -> str | None:
    """Where the phase's newest checkpoint `newest` is below its max_duration, that clock; None when it
    reached it, or cannot be told without fetching it (a bucket's, under a max_duration not in batches)."""
    from composer.core import Time, TimeUnit

    from modernbert_train.train.checkpoint import CheckpointError, checkpoint_summary
    from modernbert_train.train.checkpoint_files import checkpoint_order
    from modernbert_train.train.start import _elapsed, _reached

    if Time.from_timestring(phase.max_duration).unit is TimeUnit.BATCH:
        elapsed = Time(checkpoint_order(Path(newest))[1], TimeUnit.BATCH)  # ep{E}-ba{B}: the name says it
    elif storage.is_uri(phase.save_folder):
        return None
    else:
        try:
            elapsed = _elapsed(checkpoint_summary(Path(phase.save_folder, newest)), phase.max_duration)
        except CheckpointError:  # damaged: the phase's own start reports it
            return None
    return None if elapsed is None or _reached(elapsed, phase.max_duration) else str(elapsed)


def check_no_phase_reopened(phases: list[Phase]) -> None:
    """Refuse (ConfigError) a phase that has not reached its max_duration (or holds no checkpoint) while a
    later phase already holds checkpoints: that phase started from this one's earlier end and resumes from its
    own, so training this one on (its max_duration was raised, its checkpoints removed) would silently never
    reach it."""
    started = [bool(_checkpoint_names(phase.save_folder)) for phase in phases]
    for i, phase in enumerate(phases[:-1]):
        later = [j for j in range(i + 1, len(phases)) if started[j]]
        if not later:
            continue
        names = _checkpoint_names(phase.save_folder)
        at = _unfinished(phase, names[-1]) if names else None
        if names and at is None:
            continue
        where = f"is at {at}, below its max_duration {phase.max_duration}" if names else "holds no checkpoint"
        n, next_n, next_folder = i + 1, later[0] + 1, phases[later[0]].save_folder
        raise ConfigError(
            f"phase {n} ({phase.save_folder}) {where}, but phase {next_n} already started from its "
            f"earlier end ({next_folder} holds checkpoints) and would not see the rest: put phase {n}'s "
            "max_duration back, or move the later phases' save_folders away to redo them from its new end"
        )


def _sigterm_pending() -> bool:
    """Whether a SIGTERM reached the phase that just finished (its handler, preemption.SaveOnSigterm, is still
    installed; a SIGTERM in a phase's last batch, final save or export does not stop that phase)."""
    from modernbert_train.train.preemption import SaveOnSigterm

    owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return isinstance(owner, SaveOnSigterm) and owner.requested


def _stop_between_phases(stop: bool) -> bool:
    """Whether any rank has a SIGTERM pending, agreed by every rank (they stop together or go on together)."""
    from composer.utils import dist

    if dist.get_world_size() > 1 and dist.is_initialized():
        return any(dist.all_gather_object(stop))
    return stop


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
        check_no_phase_reopened(phases)
    except ConfigError as e:
        print(f"modernbert-pipeline: error: {e}", file=sys.stderr)
        sys.exit(2)
    from composer.utils import dist

    from modernbert_train.train.main import main as train
    from modernbert_train.train.preemption import EXIT_PREEMPTED

    for i, phase in enumerate(phases, start=1):
        if i > 1 and _stop_between_phases(_sigterm_pending()):
            if dist.get_global_rank() == 0:
                print(
                    f"modernbert-pipeline: preempted: SIGTERM after phase {i - 1} finished; phase {i} did "
                    "not start: rerun the same command to go on",
                    file=sys.stderr,
                )
            sys.exit(EXIT_PREEMPTED)
        # The finished phase's handler would swallow a SIGTERM during this phase's setup: as modernbert-train
        # does before its trainer exists, the process ends (its checkpoints are whole; a rerun goes on).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
