"""Which recipe keys a run that continues a checkpoint's clock (autoresume, or load_path without reset_time)
may change, and the one-line refusal when it changes one it may not.

Such a run loads the checkpoint's optimizer (its hyperparameters with its moments), its data stream state and
its RNG, so a changed key there was either ignored (optimizer.lr, data.batch_size_warmup), applied in part
(seed: the masks follow the recipe, the stream order the checkpoint) or failed mid-start (data.max_seq_len).
Those keys are FIXED: the run is refused before anything starts. A new phase (load_path with reset_time)
takes them all from its recipe (train/checkpoint.py's PhaseChange). FREE keys are applied as written from the
resumed batch on (the schedule, the batch size, the masking ratio, max_duration, evaluation, logging, ...);
a model change that alters a weight's shape fails the load itself (checkpoint.explain_mismatch). PATH keys
name where data lives: datasets move between clusters, so a change is reported and allowed (the tokenizer's
content is compared separately, in run.py).

A key is ruled by its longest listed dotted prefix (a data.train source's fields as `data.train.local`). A key
no rule covers counts as fixed; tests/test_recipe_changes.py checks that every schema key is covered.

The batch size is free because the data state counts the rows trained: the stream goes on where it stopped
with the new size, the batch-size warmup goes on from the rows really trained, and masking times in sp or
tok count rows (data/batch_schedule.py, train/data.py). One combination is refused: a data.mlm_probability
schedule mixing ba and sp/tok times places the latter at batch indices of the batch sizes it is built with,
so global_train_batch_size (and, during a batch-size warmup, device_train_microbatch_size) cannot change.
"""

import json
from typing import Any

from modernbert_train.train.config import time_unit, time_value

FIXED, FREE, PATH = "fixed", "free", "path"

RULES = {
    "seed": FIXED,
    "optimizer": FIXED,
    "optimizer.impl": FREE,  # the same state under either implementation
    "optimizer.compile": FREE,  # the same math
    "data.train": FIXED,  # the mixture's sources: their number, names, splits and shares
    "data.train.local": PATH,
    "data.train.remote": PATH,
    "data.tokenizer": PATH,
    "data.max_seq_len": FIXED,
    "data.lookahead": FIXED,
    "data.shuffle": FIXED,
    "data.batch_size_warmup": FIXED,
    "data.eval": FREE,
    "data.mlm_probability": FREE,
    "data.eval_mlm_probability": FREE,
    "data.num_workers": FREE,  # the data state continues on another number of workers
    "data.eval_batch_size": FREE,
    "data.cache_limit": FREE,
    "data.predownload": FREE,
    "model": FREE,
    "scheduler": FREE,
    "run_name": FREE,
    "max_duration": FREE,
    "global_train_batch_size": FREE,
    "device_train_microbatch_size": FREE,
    "precision": FREE,
    "grad_clip_norm": FREE,
    "max_nonfinite_batches": FREE,
    "eval_interval": FREE,
    "eval_subset_num_batches": FREE,
    "log_interval": FREE,
    "progress_bar": FREE,
    "speed_window": FREE,
    "profile": FREE,
    "save_folder": FREE,
    "save_interval": FREE,
    "save_num_checkpoints_to_keep": FREE,
    "autoresume": FREE,
    "save_overwrite": FREE,
    "load_path": FREE,
    "load_weights_only": FREE,
    "reset_time": FREE,
    "allow_schedule_change": FREE,
    "loggers": FREE,
    # Another world size or FSDP setting: the data state and Composer's load handle it, except a change
    # between sharded and whole checkpoints (state_dict_type), which start.py refuses by the checkpoint.
    "parallelism": FREE,
    "dist_timeout": FREE,
    "export": FREE,
}

_SHOWN = 4  # changes named in one line


def rule(key: str) -> str:
    """The rule of a dotted key (list positions left out: `data.train.local`); unlisted keys are fixed."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = RULES.get(".".join(parts[:end]))
        if found is not None:
            return found
    return FIXED


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The fixed keys that differ between the checkpoint's recipe and this one, and the paths that moved,
    each as `key=value there, value here`. Keys only one side has (a recipe written by another version of
    the schema) are not compared."""
    refused: list[str] = []
    moved: list[str] = []
    for key, there, here in _differences(saved, current, ""):
        kind = rule(_without_positions(key))
        change = f"{key}={show_value(there)} there, {show_value(here)} here"
        if kind == FIXED:
            refused.append(change)
        elif kind == PATH:
            moved.append(change)
    refused += _batch_size_changes_under_mixed_masking(saved, current)
    return refused, moved


def _batch_size_changes_under_mixed_masking(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The batch-size keys that changed, when this recipe's masking schedule mixes ba and sp/tok times."""
    if not _masking_mixes_units(current):
        return []
    keys = ["global_train_batch_size"]
    if (current.get("data", {}).get("batch_size_warmup") or {}).get("start"):
        keys.append("device_train_microbatch_size")  # it rounds the warmup's sizes
    return [
        f"{key}={show_value(saved[key])} there, {show_value(current[key])} here (data.mlm_probability mixes "
        "ba and sp/tok times: give them in one unit)"
        for key in keys
        if key in saved and key in current and saved[key] != current[key]
    ]


def _masking_mixes_units(recipe: dict[str, Any]) -> bool:
    """Whether data.mlm_probability has nonzero times both in batches (ba) and in rows (sp, tok), each 'dur'
    counting in max_duration's unit (as train/data.masking_schedule places them)."""
    spec = recipe.get("data", {}).get("mlm_probability")
    if not isinstance(spec, dict):
        return False
    if spec.get("schedule") == "linear":
        times = [spec.get("t_start", "0ba"), spec.get("t_end", "1dur")]
    else:
        times = list(spec.get("milestones") or [])
    units = set()
    for text in times:
        unit = time_unit(text)
        if unit == "dur":
            unit = time_unit(recipe["max_duration"])
        if time_value(text):
            units.add("ba" if unit == "ba" else "rows")
    return units == {"ba", "rows"}


def refusal(refused: list[str], checkpoint: str, load: bool) -> str:
    """One line naming the fixed keys that changed and the two ways on."""
    shown = "; ".join(refused[:_SHOWN]) + (
        f"; and {len(refused) - _SHOWN} more" if len(refused) > _SHOWN else ""
    )
    how = "a load without reset_time continues" if load else "a resumed run continues"
    return (
        f"recipe changed since checkpoint {checkpoint}: {shown}; {how} its optimizer, data stream and RNG, "
        f"so these keys cannot change: put them back, or start a new phase with load_path={checkpoint} "
        "reset_time=true (in another save_folder when autoresuming)"
    )


def _differences(saved: Any, current: Any, key: str):
    if isinstance(saved, dict) and isinstance(current, dict):
        for name in (name for name in saved if name in current):  # in the schema's order
            yield from _differences(saved[name], current[name], f"{key}.{name}" if key else name)
    elif key == "data.train" and isinstance(saved, list) and isinstance(current, list):
        if len(saved) != len(current):
            yield key, f"{len(saved)} sources", f"{len(current)} sources"
            return
        for position, (there, here) in enumerate(zip(saved, current)):
            yield from _differences(there, here, f"{key}.{position}")
    elif saved != current:
        yield key, saved, current


def _without_positions(key: str) -> str:
    return ".".join(part for part in key.split(".") if not part.isdigit())


def show_value(value: Any) -> str:
    """A recipe value as a refusal line shows it: strings bare, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)
