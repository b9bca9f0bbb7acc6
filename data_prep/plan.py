"""`modernbert-data plan RECIPE --tokens N`: what a run of N tokens takes from each source of a mixture.

Each source's token and document counts come from its `modernbert_data.json` (written by shard and merge),
local or remote: one small file per source, no shard is downloaded. streaming mixes by document (sample):
a source's draws per epoch are its `proportion` of the epoch's documents (normalized over the sources),
else its `choose`, else its documents times `repeat`. Its share of the run's tokens is its draws times its
mean document length over all the sources'; the epochs it implies are its tokens in the run over the
tokens it holds (> 1: its documents repeat). A proportion is a share of documents, not of tokens: a source
of long documents takes more of the run's tokens than its proportion.
"""

from pathlib import Path

import yaml

from data_prep.errors import UsageError
from data_prep.output_dir import FINISHED_MARKER, read_marker
from modernbert_train import storage


def parse_tokens(text: str) -> int:
    try:
        tokens = float(text.removesuffix("tok"))
    except ValueError:
        tokens = 0.0
    if not 0 < tokens < float("inf"):
        raise UsageError(f"--tokens {text}: expected a positive number of tokens, e.g. 1.7e12")
    return int(tokens)


def recipe_sources(recipe: Path | str) -> list[dict]:
    """`data.train` of a training recipe, or `train` of a data recipe (a local file or a URI)."""
    try:
        values = yaml.safe_load(storage.read_text(recipe))
    except FileNotFoundError:
        raise UsageError(f"plan {recipe}: cannot read it: no such file") from None
    except (OSError, ValueError, yaml.YAMLError) as e:  # storage's errors are ValueErrors
        raise UsageError(f"plan {recipe}: cannot read it: {' '.join(str(e).split())}") from None
    values = values.get("data", values) if isinstance(values, dict) else None
    sources = values.get("train") if isinstance(values, dict) else None
    if not isinstance(sources, list) or not sources:
        raise UsageError(f"plan {recipe}: no data.train (or train) list of sources")
    return sources


def _source_size(recipe: Path, i: int, source: dict) -> tuple[int, int]:
    """(tokens, documents) a source holds, from its modernbert_data.json."""
    location = source.get("remote") or source.get("local")
    if not location:
        raise UsageError(f"plan {recipe}: train.{i} has neither 'remote' nor 'local'")
    storage.check(location, f"train.{i}")
    marker = storage.join(location, FINISHED_MARKER)
    try:
        values = read_marker(marker, f"plan {recipe}: train.{i}", ("tokens", "documents"))
    except FileNotFoundError:
        raise UsageError(
            f"plan {recipe}: train.{i}: no {FINISHED_MARKER} in {location} (shard it with modernbert-data)"
        ) from None
    for key in ("tokens", "documents"):
        count = values[key]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise UsageError(f"plan {recipe}: train.{i}: {marker} has no {key} count ('{key}': {count!r})")
    return values["tokens"], values["documents"]


def plan(recipe: Path, tokens: int) -> list[dict]:
    sources = recipe_sources(recipe)
    for i, source in enumerate(sources):
        if not isinstance(source, dict):
            raise UsageError(f"plan {recipe}: train.{i} is not a source (a mapping with local or remote)")
        for key in ("proportion", "repeat", "choose"):
            value = source.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
            ):
                raise UsageError(f"plan {recipe}: train.{i}.{key} must be a positive number, got {value!r}")
        given = [key for key in ("proportion", "repeat", "choose") if source.get(key) is not None]
        if len(given) > 1:
            raise UsageError(f"plan {recipe}: train.{i} gives {' and '.join(given)}; give at most one")
    with_proportion = [s for s in sources if s.get("proportion") is not None]
    if with_proportion and len(with_proportion) != len(sources):
        raise UsageError(f"plan {recipe}: give every source a proportion, or none")
    sizes = [_source_size(recipe, i, s) for i, s in enumerate(sources)]
    if with_proportion:
        draws = [float(s["proportion"]) for s in sources]  # relative: shares of the epoch's documents
    else:
        draws = [
            float(s["choose"]) if s.get("choose") is not None else documents * float(s.get("repeat", 1.0))
            for s, (_, documents) in zip(sources, sizes)
        ]
    weights = [d * held / documents if documents else 0.0 for d, (held, documents) in zip(draws, sizes)]
    total = sum(weights)
    if total <= 0:
        raise UsageError(f"plan {recipe}: the sources' draws (proportions or sizes) hold no tokens")
    rows = []
    for i, (source, (held, _), draw, weight) in enumerate(zip(sources, sizes, draws, weights)):
        share = weight / total
        rows.append(
            {
                "source": source.get("name") or source.get("remote") or source.get("local") or f"train.{i}",
                "tokens_available": held,
                "documents_share": draw / sum(draws),
                "share": share,
                "tokens_in_run": round(share * tokens),
                "epochs": share * tokens / held if held else float("inf"),
            }
        )
    return rows


def format_plan(rows: list[dict], tokens: int) -> str:
    lines = [f"{'source':<40} {'available':>18} {'docs':>7} {'tokens':>7} {'in run':>18} {'epochs':>7}"]
    for row in rows:
        lines.append(
            f"{row['source']:<40} {row['tokens_available']:>18,} {row['documents_share']:>7.1%} "
            f"{row['share']:>7.1%} {row['tokens_in_run']:>18,} {row['epochs']:>7.2f}"
        )
    held = sum(row["tokens_available"] for row in rows)
    ratio = tokens / held if held else 0
    lines.append(f"{'total':<40} {held:>18,} {1:>7.1%} {1:>7.1%} {tokens:>18,} {ratio:>7.2f}")
    lines.append("docs: a source's share of the documents drawn (streaming mixes by document)")
    lines.append("tokens: its share of the run's tokens (its draws times its mean document length)")
    return "\n".join(lines)
