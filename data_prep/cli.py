"""`modernbert-data`: shard text into MDS, inspect a shard folder, train a tokenizer.

Exit status: 0 done; 1 done but some input file could not be read (reported), or an unexpected error;
2 bad usage (unknown flag, missing input or tokenizer, existing output without --overwrite).
Errors are one line; `--debug` shows the traceback of unexpected ones.
"""

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

from data_prep.errors import UsageError
from data_prep.read_report import ReadReport
from modernbert_train.cli_parser import OneLineErrorParser
from modernbert_train.storage import StorageError

EXIT_INPUT_PROBLEM = 1
EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _path_or_uri(text: str) -> Path | str:
    """A local path, or a URI kept as text (checked here, so a malformed one is a usage error)."""
    from modernbert_train import storage

    if not storage.is_uri(text):
        return Path(storage.expand_home(text))
    try:
        storage.parse(text)
    except storage.StorageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        action="extend",
        nargs="+",
        default=[],
        metavar="PATH",
        help="file or folder (recursive): .jsonl[.gz|.zst], .parquet, any other text file",
    )
    parser.add_argument("--text-field", default="text", help="jsonl key / parquet column of the text")
    parser.add_argument(
        "--hf-dataset", metavar="NAME", help="a Hugging Face dataset (hub name or local folder)"
    )
    parser.add_argument("--hf-split", default="train", metavar="SPLIT")
    parser.add_argument("--hf-config", metavar="CONFIG")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def build_parser() -> argparse.ArgumentParser:
    common = OneLineErrorParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    parser = OneLineErrorParser(prog="modernbert-data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shard = commands.add_parser("shard", parents=[common], help="tokenize documents into MDS shards")
    _add_input_arguments(shard)
    shard.add_argument("--output", required=True, type=_path_or_uri, metavar="DIR", help="folder or URI")
    shard.add_argument(
        "--tokenizer",
        required=True,
        metavar="TOK",
        help="a tokenizer.json, a folder holding one, or a hub name",
    )
    shard.add_argument(
        "--workers",
        type=_positive_int,
        default=len(os.sched_getaffinity(0)),
        help="tokenizer processes (default: the CPUs this process may use)",
    )
    shard.add_argument("--size-limit", default="64mb", help="uncompressed bytes per shard (e.g. 64mb)")
    for role in ("cls", "sep", "pad", "mask"):
        shard.add_argument(
            f"--{role}-token",
            metavar="TOKEN",
            help=f"the tokenizer's {role} token, where it is not spelled the BERT or RoBERTa way",
        )
    shard.add_argument("--source", metavar="NAME", help="source name of every document (default: input name)")
    shard.add_argument(
        "--num-tasks",
        type=_positive_int,
        metavar="N",
        help="shard across N machines: this task writes OUTPUT/part-I-of-N from 1/N of the input files "
        "(default: SLURM_ARRAY_TASK_COUNT, else 1); then run merge OUTPUT",
    )
    shard.add_argument(
        "--task-index",
        type=int,
        metavar="I",
        help="this task's index, 0..N-1 (default: SLURM_ARRAY_TASK_ID, else JOB_COMPLETION_INDEX, else 0)",
    )

    inspect = commands.add_parser("inspect", parents=[common], help="count documents and tokens in DIR")
    inspect.add_argument("dir", type=_path_or_uri, metavar="DIR", help="folder or URI")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    merge = commands.add_parser("merge", parents=[common], help="join the parts of sharding tasks")
    merge.add_argument("output", type=_path_or_uri, metavar="OUTPUT", help="the --output of the tasks")

    plan = commands.add_parser("plan", parents=[common], help="tokens, share and epochs per mixture source")
    plan.add_argument(
        "recipe", type=_path_or_uri, metavar="RECIPE", help="a training or data recipe (data.train), or a URI"
    )
    plan.add_argument("--tokens", required=True, metavar="N", help="tokens the run trains on, e.g. 1.7e12")
    plan.add_argument("--json", action="store_true", help="print one JSON object")

    train = commands.add_parser("train-tokenizer", parents=[common], help="train a byte-level BPE tokenizer")
    _add_input_arguments(train)
    train.add_argument("--output", required=True, type=_path_or_uri, metavar="DIR", help="folder or URI")
    train.add_argument("--vocab-size", type=_positive_int, default=32768, help="a multiple of 64")
    return parser


def _documents(args, report: ReadReport, source: str | None = None, task: tuple[int, int] = (0, 1)):
    """The documents of --input and --hf-dataset, in that order (inputs and datasets resolved now); of a
    task's share of the input files when `task` (index, count) splits them."""
    from data_prep.parts import task_inputs
    from data_prep.readers import expand_inputs, read_documents

    if not args.input and not args.hf_dataset:
        raise UsageError("give at least one --input PATH or --hf-dataset NAME")
    if args.hf_dataset and task[1] > 1:
        raise UsageError("--num-tasks splits --input files; shard --hf-dataset in a single task")
    inputs = task_inputs(expand_inputs(args.input, source, report), *task)
    streams = [read_documents(inputs, args.text_field, report)]
    if args.hf_dataset:
        from data_prep.hf_dataset import open_hf_dataset, read_hf_documents

        dataset = open_hf_dataset(args.hf_dataset, args.hf_split, args.hf_config, args.text_field)
        origin = f"{args.hf_dataset}[{args.hf_split}]"
        name = source or Path(args.hf_dataset).name
        streams.append(read_hf_documents(dataset, origin, name, args.text_field, report))
    return itertools.chain.from_iterable(streams)


def _finish(report: ReadReport) -> int:
    for line in report.summary_lines():
        print(line, file=sys.stderr)
    return EXIT_INPUT_PROBLEM if report.unreadable else 0


def _already_sharded(args) -> bool:
    """A URI output or a task's part that a run with these inputs finished: a rerun (a requeued job) has
    nothing to do."""
    from data_prep.output_dir import FINISHED_MARKER, is_finished
    from modernbert_train import storage

    if args.overwrite or not (storage.is_uri(args.output) or args.task[1] > 1):
        return False
    storage.check(args.output, "--output")
    if not is_finished(args.output):
        return False
    inputs = json.loads(storage.read_text(storage.join(args.output, FINISHED_MARKER))).get("inputs")
    if inputs != _input_names(args):
        raise UsageError(
            f"--output {args.output}: already holds a dataset sharded from other inputs ({inputs}); "
            "pass --overwrite to replace it"
        )
    print(f"{args.output} is already sharded from these inputs; nothing to do")
    return True


def _input_names(args) -> list[str]:
    return args.input + ([f"hf:{args.hf_dataset}[{args.hf_split}]"] if args.hf_dataset else [])


def run_shard(args) -> int:
    from data_prep.output_dir import check_output_apart, check_output_free
    from data_prep.parts import part_name, resolve_task
    from data_prep.shard import parse_size_limit, shard
    from data_prep.tokenizer_load import load_tokenizer
    from modernbert_train import storage

    args.task = resolve_task(args.task_index, args.num_tasks)
    if args.task[1] > 1:
        part = part_name(*args.task)
        args.output = storage.join(args.output, part) if storage.is_uri(args.output) else args.output / part
    check_output_apart(args.output, args.input or [])
    if _already_sharded(args):
        return 0
    named = {f"{role}_token": getattr(args, f"{role}_token") for role in ("cls", "sep", "pad", "mask")}
    tokenizer = load_tokenizer(args.tokenizer, named)
    size_limit = parse_size_limit(args.size_limit)
    check_output_free(args.output, args.overwrite)
    report = ReadReport()
    documents = _documents(args, report, args.source, args.task)
    metadata = shard(
        documents,
        args.output,
        tokenizer,
        report=report,
        workers=args.workers,
        size_limit=size_limit,
        overwrite=args.overwrite,
        progress=sys.stderr.isatty(),
        inputs=_input_names(args),
        text_field=args.text_field,
        allow_empty=args.task[1] > 1,
    )
    print(
        f"wrote {metadata['documents']:,} documents, {metadata['tokens']:,} tokens "
        f"({metadata['dtype']}, {metadata['shards']} shard(s)) to {args.output}"
    )
    for name, counts in metadata["sources"].items():
        print(f"  {name}: {counts['documents']:,} documents, {counts['tokens']:,} tokens")
    return _finish(report)


def run_merge(args) -> int:
    from data_prep.parts import merge

    merged = merge(str(args.output))
    print(
        f"merged {len(merged['parts'])} parts: {merged['documents']:,} documents, "
        f"{merged['tokens']:,} tokens ({merged['shards']} shard(s)) in {args.output}"
    )
    return 0


def run_plan(args) -> int:
    from data_prep.plan import format_plan, parse_tokens, plan

    tokens = parse_tokens(args.tokens)
    rows = plan(args.recipe, tokens)
    print(json.dumps({"tokens": tokens, "sources": rows}) if args.json else format_plan(rows, tokens))
    return 0


def run_inspect(args) -> int:
    from data_prep.inspect_shards import format_report, inspect_folder
    from modernbert_train import storage

    if storage.is_uri(args.dir):
        storage.check(args.dir, "inspect")
        try:
            with storage.local_folder(args.dir) as folder:
                result = {**inspect_folder(folder), "path": args.dir}
        except FileNotFoundError:
            raise UsageError(f"inspect {args.dir}: no such folder (nothing stored under it)") from None
    else:
        result = inspect_folder(args.dir)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def run_train_tokenizer(args) -> int:
    from data_prep.output_dir import check_output_apart, check_output_free
    from data_prep.tokenizer_train import check_vocab_size, train_tokenizer

    check_vocab_size(args.vocab_size)
    check_output_apart(args.output, args.input or [])
    check_output_free(args.output, args.overwrite)
    report = ReadReport()
    texts = (document.text for document in _documents(args, report))
    tokenizer = train_tokenizer(texts, args.output, args.vocab_size, overwrite=args.overwrite)
    print(f"wrote a {tokenizer.get_vocab_size():,}-token tokenizer to {args.output}")
    return _finish(report)


COMMANDS = {
    "shard": run_shard,
    "merge": run_merge,
    "plan": run_plan,
    "inspect": run_inspect,
    "train-tokenizer": run_train_tokenizer,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already printed
        return exit.code
    try:
        return COMMANDS[args.command](args)
    except (UsageError, StorageError) as error:
        print(f"modernbert-data {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"modernbert-data {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())
        print(
            f"modernbert-data {args.command}: error: {type(error).__name__}: {message} "
            "(--debug shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INPUT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
