"""The README names only what exists: every recipe key it mentions is a schema key, its YAML examples and the
overrides of its commands fit the schema, the recipes it runs are there, and every --flag it gives belongs
to one of the project's commands (or to the outside tools its examples call)."""

import re
import types
import typing
from dataclasses import fields, is_dataclass

import yaml
from composer.cli.launcher import _get_parser as composer_launcher_parser
from conftest import REPO
from omegaconf import OmegaConf

from data_prep import cli as data_cli
from modernbert_train.finetune import cli as finetune_cli
from modernbert_train.report import cli as report_cli
from modernbert_train.train import export, main, pipeline
from modernbert_train.train.schema import TrainConfig

README = (REPO / "README.md").read_text()
PROSE = re.sub(r"```.*?```", "", README, flags=re.S)  # fenced blocks taken out: inline spans pair up
SPANS = re.findall(r"`([^`]+)`", PROSE)
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
SECTIONS = tuple(name for name, kind in typing.get_type_hints(TrainConfig).items() if is_dataclass(kind))
# Flags of the outside tools the README's examples call: sbatch, docker build, wandb sync; `--flag=~/x` is
# the README's name for any flag.
OUTSIDE_FLAGS = {
    "--wrap",
    "--parsable",
    "--array",
    "--cpus-per-task",
    "--dependency",
    "--build-arg",
    "--append",
}


def schema_path_exists(path: str) -> bool:
    """Whether a dotted recipe key (`data.train[].local`, `model.overrides.num_hidden_layers`) is in the
    schema; below a dict-typed key (model.overrides) any name is."""
    kind: typing.Any = TrainConfig
    for part in path.split("."):
        listed = part.endswith("[]")
        part = part.removesuffix("[]")
        if typing.get_origin(kind) is dict:
            return not listed
        if not is_dataclass(kind):
            return False
        hints = typing.get_type_hints(kind)
        if part not in hints:
            return False
        kind = hints[part]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        if listed:
            if typing.get_origin(kind) is not list:
                return False
            (kind,) = typing.get_args(kind)
    return True


def test_every_recipe_key_the_readme_names_is_a_schema_key():
    section = "|".join(SECTIONS)
    named = {
        m.group(1).rstrip(".")
        for span in SPANS
        for m in re.finditer(rf"(?<![\w/.-])((?:{section})\.[A-Za-z_.\[\]]+)", span)
    }
    overrides = {
        pair.split("=")[0]
        for span in SPANS
        if re.fullmatch(r"[a-z_.]+=\S+( [a-z_.]+=\S+)*", span)
        for pair in span.split()
        if pair.split(".")[0].split("=")[0] in {f.name for f in fields(TrainConfig)} | set(SECTIONS)
    }
    composer_names = re.search(r"Top-level keys follow Composer's names\n?\s*\(([^)]*)\)", PROSE).group(1)
    top_level = set(re.findall(r"`(\w+)`", composer_names))
    assert len(named) > 20 and len(overrides) >= 5 and len(top_level) >= 10  # the README was read
    missing = sorted(key for key in named | overrides | top_level if not schema_path_exists(key))
    assert not missing, f"README names recipe keys the schema lacks: {missing}"


def test_readme_yaml_examples_and_command_overrides_fit_the_schema():
    schema = OmegaConf.structured(TrainConfig)
    examples = [yaml.safe_load(text) for lang, text in BLOCKS if lang == "yaml"]
    recipes = [example for example in examples if isinstance(example, dict) and "data" in example]
    assert recipes
    for recipe in recipes:
        OmegaConf.merge(schema, recipe)  # an unknown key or a wrong type raises

    commands = [
        line
        for lang, text in BLOCKS
        if lang == "bash"
        for line in text.replace("\\\n", " ").splitlines()
        if re.search(r"modernbert-(train|pipeline) |-m modernbert_train\.train(\.pipeline)? ", line)
    ]
    assert len(commands) >= 4
    for command in commands:
        words = command.split("#")[0].split()
        recipes = [word for word in words if word.startswith("yamls/")]
        assert recipes and all((REPO / word).is_file() for word in recipes), command
        overrides = [word for word in words if re.fullmatch(r"[a-z_.]+=\S+", word)]
        OmegaConf.merge(schema, OmegaConf.from_dotlist(overrides))


def help_text(command, argv: list[str], capsys) -> str:
    try:
        code = command(argv)  # data_prep.cli.main returns its exit code
    except SystemExit as exited:
        code = exited.code
    assert code in (0, None), argv
    return capsys.readouterr().out


def test_every_flag_the_readme_gives_is_a_real_one(capsys):
    texts = [
        help_text(main.parse_args, ["--help"], capsys),
        help_text(pipeline.parse_args, ["--help"], capsys),
        help_text(export.cli, ["--help"], capsys),
        help_text(export.cli, ["--average", "--help"], capsys),
        help_text(report_cli, ["--help"], capsys),
        help_text(finetune_cli.cli, ["--help"], capsys),
        composer_launcher_parser().format_help(),
    ]
    for command in ("shard", "inspect", "merge", "plan", "train-tokenizer"):
        texts.append(help_text(data_cli.main, [command, "--help"], capsys))
    known = set(re.findall(r"--[a-z][a-z0-9_-]*", "\n".join(texts))) | OUTSIDE_FLAGS
    given = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", README)) - {"--flag"}
    assert not sorted(given - known), f"README flags no command has: {sorted(given - known)}"


def test_the_readme_paths_it_runs_exist():
    files = r"(?:yamls|benchmarks|docker|docs)/[\w./-]+\.(?:yaml|py|sh|md|txt)|docker/Dockerfile"
    paths = set(re.findall(rf"(?<![\w/.])({files})", README))
    assert paths
    missing = sorted(p for p in paths if not (REPO / p).exists() and "{" not in p)
    assert not missing, f"README names files that are not there: {missing}"
