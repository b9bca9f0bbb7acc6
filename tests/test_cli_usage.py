"""A usage error on any command line is one line naming the problem, exit 2 (argparse printed a usage block
of 3 to 9 lines above it; modernbert-data alone kept to one)."""

import importlib

import pytest

COMMANDS = [
    ("modernbert_train.train.main", "main", ["recipe.yaml", "--bogus"], "modernbert-train"),
    ("modernbert_train.train.pipeline", "main", [], "modernbert-pipeline"),
    ("modernbert_train.train.export", "cli", ["only-one"], "modernbert-export"),
    (
        "modernbert_train.train.export",
        "cli",
        ["--average", "a.pt", "b.pt", "out", "--bogus"],
        "modernbert-export",
    ),
    ("modernbert_train.report", "cli", ["run", "--smoothing"], "modernbert-report"),
    ("modernbert_train.finetune.cli", "cli", ["model"], "modernbert-finetune"),
    ("modernbert_train.finetune.embedded_eval", "main", ["model", "--task", "nope"], "embedded_eval"),
    ("data_prep.cli", "main", ["shard", "--workers", "0"], "modernbert-data"),
]


@pytest.mark.parametrize(
    "module, function, argv, prog", COMMANDS, ids=[f"{c[3]}-{i}" for i, c in enumerate(COMMANDS)]
)
def test_a_usage_error_is_one_line(module, function, argv, prog, capsys):
    run = getattr(importlib.import_module(module), function)
    try:
        code = run(argv)
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and prog in error and "error: " in error, error
