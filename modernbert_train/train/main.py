"""`modernbert-train CONFIG.yaml [key=value ...]`: validate the recipe, then train.

The recipe is checked before Composer (a few seconds to import) or any data is touched. Exit status: 0 when
training completed (or had already completed); 2 for bad input (one line on stderr); 1 when training failed
(one line on stderr, the traceback in a file it names); 75 when a SIGTERM stopped it after a checkpoint was
saved (rerun the same command to resume; nothing is exported); 143 when a SIGTERM stopped a run without a
save_folder. A run that lost its bucket save_folder's lock (another run holds it now, or may) stops at the end
of the batch with 1 and one line naming the lock, and writes nothing more into the folder.
"""

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

from modernbert_train.cli_parser import OneLineErrorParser
from modernbert_train.train.config import ConfigError, load_config
from modernbert_train.train.schema import TrainConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        prog="modernbert-train",
        description="Pretrain a ModernBERT encoder from a YAML recipe.",
        epilog="example: modernbert-train yamls/default.yaml max_duration=200ba save_folder=runs/try",
    )
    parser.add_argument("config", help="YAML recipe (see yamls/)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides in dotted form, e.g. data.num_workers=2"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lock = config = None
    try:
        config = load_config(args.config, args.overrides)
        from composer.utils import dist

        from modernbert_train.train.export import check_export_target
        from modernbert_train.train.run_lock import hold_run_lock_on_rank_0
        from modernbert_train.train.start import StartKind, decide_start, replace_earlier_run

        if config.save_folder:  # every rank: a refusal reaches all of them, not rank 0 alone
            lock = hold_run_lock_on_rank_0(config.save_folder, config.dist_timeout)  # before anything is read
        if config.export.hf_dir:
            check_export_target(config.export.hf_dir, overwrite=False)
        start = decide_start(config)
        if start.kind is StartKind.COMPLETE:
            # A requeued job or a rerun pipeline repeats the command of a finished run: not an error.
            if dist.get_global_rank() == 0:
                print(start.completion_message(config))
                export_if_missing(config, start.checkpoint)
            if lock is not None:
                lock.drop()
            return
        if lock is not None:
            lock.claim()
        from modernbert_train.train.run import build_run

        run = build_run(config, start, lock)
        if dist.get_global_rank() == 0:
            replace_earlier_run(config, start)  # only now: nothing can refuse the recipe any more
    except (ConfigError, ValueError) as e:
        # ValueError: the model, optimizer, scheduler, data and checkpoint builders' one-line errors.
        if lock is not None:
            lock.drop()
        print(f"modernbert-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # The machine, not the recipe: a full disk or a read-only folder while setting up (the lock, the
        # resolved config). The user can fix it and rerun the same command.
        if lock is not None:
            lock.drop()
        where = f"{e.filename}: " if e.filename else ""
        reason = e.strerror or _one_line(e)
        print(f"modernbert-train: error: {where}{reason} while setting up the run; nothing was trained: fix "
              "it and rerun the same command", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    except (Exception, _checkpoint_exception()) as e:  # a BaseException of torch's
        if lock is not None:
            lock.drop()
        where = _write_traceback(config, _rank())
        print(f"modernbert-train: error: {_one_line(e)} (traceback in {where})", file=sys.stderr)
        sys.exit(1)
    from modernbert_train.train.checkpoint_files import CheckpointSaveError
    from modernbert_train.train.preemption import EXIT_PREEMPTED

    try:
        exit_code = run.fit()
    except CheckpointSaveError as e:
        print(f"modernbert-train: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (Exception, _checkpoint_exception()) as e:  # a BaseException of torch's
        where = _write_traceback(config, dist.get_global_rank())
        print(f"modernbert-train: error: {_one_line(e)} (traceback in {where})", file=sys.stderr)
        sys.exit(1)
    if run.preemption.lost is not None:
        at = run.trainer.state.timestamp.batch
        print(
            f"modernbert-train: error: {run.preemption.lost}; stopped at batch {at.value} without saving "
            f"anything more to {config.save_folder}",
            file=sys.stderr,
        )
    elif exit_code == EXIT_PREEMPTED and dist.get_global_rank() == 0:
        at = run.trainer.state.timestamp.batch
        print(
            f"modernbert-train: preempted: stopped at batch {at.value} with a checkpoint in "
            f"{config.save_folder}; rerun the same command to resume",
            file=sys.stderr,
        )
    sys.exit(exit_code)


def export_if_missing(config: TrainConfig, checkpoint: str | None) -> None:
    """A run killed after its last checkpoint but before (or while) exporting: export it now, from that
    checkpoint. The export is swapped in whole, so a folder with a config.json is a finished one."""
    from modernbert_train import storage
    from modernbert_train.train.export import export_checkpoint

    hf_dir = config.export.hf_dir
    if not hf_dir or checkpoint is None or storage.exists(storage.join(hf_dir, "config.json")):
        return
    export_checkpoint(checkpoint, hf_dir)  # a whole file, or a sharded checkpoint's folder
    print(f"modernbert-train: exported the final checkpoint {checkpoint} to {hf_dir} (it was missing)")


def _checkpoint_exception() -> type[BaseException]:
    """torch.distributed.checkpoint's error (a sharded checkpoint's save or load failed): a BaseException,
    which `except Exception` lets through as a traceback. Imported when an error is being handled."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    if any(line.startswith("Original Traceback") for line in lines):
        return lines[-1]  # a DataLoader worker's error, re-raised: its own last line names it
    return f"{type(error).__name__}: {lines[0]}"


def _rank() -> int:
    from composer.utils import dist

    return dist.get_global_rank()


def _write_traceback(config: TrainConfig | None, rank: int) -> Path:
    """The current exception's traceback, in the save folder or else a temporary file."""
    text = traceback.format_exc()
    if config is not None and config.save_folder and "://" not in config.save_folder:
        path = Path(config.save_folder, f"traceback-rank{rank}.log")
        try:
            path.write_text(text)
            return path
        except OSError:
            pass
    with tempfile.NamedTemporaryFile("w", prefix="modernbert-train-", suffix=".log", delete=False) as f:
        f.write(text)
    return Path(f.name)


def cli() -> None:
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
