"""`modernbert-train CONFIG.yaml [key=value ...]`: validate the recipe, then train.

The recipe is checked before Composer (a few seconds to import) or any data is touched; any bad input
exits with status 2 and one line on stderr.
"""

import argparse
import sys

from modernbert_train.train.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
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
    try:
        config = load_config(args.config, args.overrides)
        from composer.utils import dist

        from modernbert_train.train.start import StartKind, decide_start

        start = decide_start(config)
        if start.kind is StartKind.COMPLETE:
            # A requeued job or a rerun pipeline repeats the command of a finished run: not an error.
            if dist.get_global_rank() == 0:
                print(start.completion_message(config))
            return
        from modernbert_train.train.run import build_run

        run = build_run(config, start)
    except (ConfigError, ValueError) as e:
        # ValueError: the model, optimizer, scheduler, data and checkpoint builders' one-line errors.
        print(f"modernbert-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    run.fit()


def cli() -> None:
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
