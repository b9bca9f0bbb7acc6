"""A run that continues a checkpoint's clock (autoresume, load_path without reset_time) with a changed recipe
(train/recipe_changes.py, train/start.py): a key the checkpoint fixes (optimizer, seed, the data stream) is
refused in one line before anything starts, a moved dataset is reported, the rest is free; the recipe is
read from whole and sharded checkpoints; a checkpoint trained with another tokenizer is refused.
End to end (a real resume refused, on one rank and two): test_train_start.py."""

import dataclasses
import json
import shutil
import typing
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from modernbert_train.data.tokens import tokenizer_identity
from modernbert_train.train.checkpoint import CheckpointError, checkpoint_summary
from modernbert_train.train.config import load_config, to_dict
from modernbert_train.train.recipe_changes import FIXED, FREE, PATH, RULES, recipe_changes, rule
from modernbert_train.train.run import _check_tokenizer
from modernbert_train.train.schema import TrainConfig
from modernbert_train.train.start import RunStart, StartKind, decide_start


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, dotted (a list of sources as its item's fields: data.train.local)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = hint if dataclasses.is_dataclass(hint) else args[0] if len(args) == 1 else None
        if inner is not None and dataclasses.is_dataclass(inner):
            keys += schema_keys(inner, f"{key}.")
        else:
            keys.append(key)
    return keys


def listed_rule(key: str) -> str | None:
    parts = key.split(".")
    return next(
        (RULES[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in RULES), None
    )


def test_every_schema_key_has_a_rule_and_every_rule_a_key():
    keys = schema_keys(TrainConfig)
    assert "data.train.local" in keys and "optimizer.lr" in keys and "loggers.wandb.project" in keys
    assert [key for key in keys if listed_rule(key) is None] == []
    stale = [r for r in RULES if not any(k == r or k.startswith(f"{r}.") for k in keys)]
    assert stale == []


def test_rules():
    for key in (
        "seed",
        "optimizer.lr",
        "optimizer.betas",
        "data.max_seq_len",
        "data.lookahead",
        "data.shuffle",
        "data.batch_size_warmup.start",
        "data.train.proportion",
        "data.train.name",
        "a.key.no.rule.has",
    ):
        assert rule(key) == FIXED, key
    for key in ("data.train.local", "data.train.remote", "data.tokenizer"):
        assert rule(key) == PATH, key
    for key in (
        "max_duration",
        "global_train_batch_size",
        "scheduler.t_decay",
        "data.mlm_probability.start",
        "model.overrides.global_rope_theta",
        "data.num_workers",
        "parallelism.fsdp.state_dict_type",
    ):
        assert rule(key) == FREE, key


@pytest.fixture
def recipe(write_recipe) -> dict:
    return to_dict(load_config(write_recipe()))


def changed(recipe: dict, **dotted) -> dict:
    out = json.loads(json.dumps(recipe))
    for key, value in dotted.items():
        *parents, last = key.split("__")
        node = out
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = value
    return out


def test_fixed_keys_are_refused_free_ones_allowed_and_moved_data_reported(recipe):
    assert recipe_changes(recipe, recipe) == ([], [])
    refused, moved = recipe_changes(
        recipe,
        changed(
            recipe,
            optimizer__lr=1e-3,
            optimizer__betas=[0.9, 0.95],
            seed=18,
            data__max_seq_len=128,
            data__batch_size_warmup__start=4,
            data__train__0__proportion=0.5,
        ),
    )
    assert refused == [  # in the schema's order
        "data.train.0.proportion=null there, 0.5 here",
        "data.max_seq_len=64 there, 128 here",
        "data.batch_size_warmup.start=0 there, 4 here",
        "optimizer.lr=0.003 there, 0.001 here",
        "optimizer.betas=[0.9, 0.98] there, [0.9, 0.95] here",
        "seed=17 there, 18 here",
    ]
    assert moved == []
    free = changed(
        recipe,
        max_duration="24ba",
        global_train_batch_size=16,
        data__mlm_probability=0.15,
        scheduler__t_decay="0.2dur",
        model__attn_backend="sdpa",
        log_interval="5ba",
        save_interval="2ba",
    )
    assert recipe_changes(recipe, free) == ([], [])
    old = recipe["data"]["train"][0]["local"]
    refused, moved = recipe_changes(recipe, changed(recipe, data__train__0__local="/mnt/moved/train"))
    assert refused == [] and moved == [f"data.train.0.local={old} there, /mnt/moved/train here"]


def test_another_number_of_sources_is_refused_and_keys_one_side_lacks_are_not_compared(recipe):
    two = changed(recipe, data__train=[*recipe["data"]["train"], {**recipe["data"]["train"][0], "name": "b"}])
    assert recipe_changes(recipe, two) == (["data.train=1 sources there, 2 sources here"], [])
    older = json.loads(json.dumps(recipe))
    del older["optimizer"]["decouple_lr"], older["data"]["batch_size_warmup"]  # a recipe of an older schema
    assert recipe_changes(older, recipe) == ([], [])


def save_checkpoint(
    path: Path, recipe: dict | None, batch: int = 4, sharded: bool = False, tokenizer="{}"
) -> Path:
    """A checkpoint with the parts start.py reads: the clock and the run metadata (Composer's layout)."""
    metadata = {"json": json.dumps({"model_config": {}, "tokenizer_json": tokenizer, "recipe": recipe})}
    clock = {"epoch": 0, "batch": batch, "sample": 8 * batch, "token": 512 * batch}
    state = {"timestamp": {"Timestamp": clock}, "model": {"model.w": torch.zeros(2)}}
    if recipe is not None:
        state["callbacks"] = {"RunMetadata": metadata}
    path.parent.mkdir(parents=True, exist_ok=True)
    if sharded:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"state": state}, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    else:
        torch.save({"state": state}, path)
    return path


@pytest.mark.parametrize("sharded", [False, True])
def test_summary_reads_the_recipe_of_whole_and_sharded_checkpoints(tmp_path, recipe, sharded):
    name = "ep0-ba4" if sharded else "ep0-ba4-rank0.pt"
    path = save_checkpoint(tmp_path / name, recipe, sharded=sharded, tokenizer='{"model": 1}')
    summary = checkpoint_summary(path)
    assert summary.clock == {"epoch": 0, "batch": 4, "sample": 32, "token": 2048}
    assert summary.recipe == recipe
    assert summary.tokenizer_identity == tokenizer_identity('{"model": 1}')
    old = checkpoint_summary(save_checkpoint(tmp_path / "old" / name, None, sharded=sharded))
    assert old.recipe is None and old.tokenizer_identity is None and old.clock["batch"] == 4


def resumable(write_recipe, tmp_path, **sections):
    """A recipe autoresuming (to 12ba) from a 4-batch checkpoint in its save_folder saved by the unchanged
    recipe; the config of the recipe with `sections` merged in."""
    saved = to_dict(load_config(write_recipe(autoresume=True)))
    save_checkpoint(tmp_path / "run" / "ep0-ba4-rank0.pt", saved)
    (tmp_path / "run" / "latest-rank0.pt").symlink_to("ep0-ba4-rank0.pt")  # as Composer leaves it
    return load_config(write_recipe(autoresume=True, **sections))


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resume_that_changed_fixed_keys_is_refused_in_one_line_with_nothing_changed(write_recipe, tmp_path):
    config = resumable(write_recipe, tmp_path, optimizer={"lr": 1e-3}, seed=3)
    before = listing(tmp_path / "run")
    with pytest.raises(CheckpointError) as refused:
        decide_start(config)
    checkpoint = tmp_path / "run" / "ep0-ba4-rank0.pt"
    assert str(refused.value) == (
        f"recipe changed since checkpoint {checkpoint}: optimizer.lr=0.003 there, 0.001 here; seed=17 there, "
        "3 here; a resumed run continues its optimizer, data stream and RNG, so these keys cannot change: "
        f"put them back, or start a new phase with load_path={checkpoint} reset_time=true (in another "
        "save_folder when autoresuming)"
    )
    assert "\n" not in str(refused.value)
    assert listing(tmp_path / "run") == before


def test_a_resume_with_free_changes_goes_on_and_a_moved_dataset_is_reported(
    write_recipe, tmp_path, tiny_data, capsys
):
    config = resumable(write_recipe, tmp_path, max_duration="20ba", scheduler={"t_decay": "4ba"})
    start = decide_start(config)
    assert (start.kind, start.checkpoint) == (StartKind.RESUME, str(tmp_path / "run" / "ep0-ba4-rank0.pt"))
    assert start.tokenizer_identity == tokenizer_identity("{}")
    shutil.copytree(tiny_data / "train", tmp_path / "moved")
    config = load_config(write_recipe(autoresume=True), [])
    config.data.train[0].local = str(tmp_path / "moved")
    assert decide_start(config).kind is StartKind.RESUME
    err = capsys.readouterr().err
    assert f"data.train.0.local={tiny_data / 'train'} there, {tmp_path / 'moved'} here" in err


def test_a_finished_run_rerun_with_changes_is_complete_not_refused(write_recipe, tmp_path):
    config = resumable(write_recipe, tmp_path, max_duration="4ba", optimizer={"lr": 1e-3})
    assert decide_start(config).kind is StartKind.COMPLETE


def test_a_load_without_reset_time_is_checked_a_phase_change_is_not(write_recipe, tmp_path):
    saved = to_dict(load_config(write_recipe()))
    checkpoint = save_checkpoint(tmp_path / "other" / "ep0-ba4-rank0.pt", saved)
    load = load_config(write_recipe(load_path=str(checkpoint), data={"lookahead": 32}))
    with pytest.raises(
        CheckpointError, match=r"data\.lookahead=16 there, 32 here; a load without reset_time"
    ):
        decide_start(load)
    phase = load_config(write_recipe(load_path=str(checkpoint), reset_time=True, data={"lookahead": 32}))
    assert decide_start(phase).kind is StartKind.PHASE_CHANGE
    # the saved tokenizer, checked at start
    assert decide_start(phase).tokenizer_identity == tokenizer_identity("{}")
    weights = load_config(
        write_recipe(load_path=str(checkpoint), load_weights_only=True, data={"lookahead": 32})
    )
    assert decide_start(weights).kind is StartKind.LOAD


def test_a_checkpoint_without_a_recipe_resumes_unchecked(write_recipe, tmp_path):
    save_checkpoint(tmp_path / "run" / "ep0-ba4-rank0.pt", None)
    config = load_config(write_recipe(autoresume=True, optimizer={"lr": 1e-3}))
    assert decide_start(config).kind is StartKind.RESUME


def test_another_tokenizer_than_the_checkpoints_is_refused(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": "a"}')
    same = RunStart(StartKind.RESUME, "ckpt.pt", tokenizer_identity=tokenizer_identity('{"model": "a"}'))
    _check_tokenizer(same, tokenizer)
    # The same vocabulary in another file (reformatted, another version field) is the same tokenizer.
    tokenizer.write_text('{\n  "version": "1.0",\n  "model": "a"\n}\n')
    _check_tokenizer(same, tokenizer)
    other = RunStart(StartKind.LOAD, "ckpt.pt", tokenizer_identity=tokenizer_identity('{"model": "b"}'))
    with pytest.raises(CheckpointError, match=f"tokenizer {tokenizer} is not the one checkpoint ckpt.pt was"):
        _check_tokenizer(other, tokenizer)
    # A phase change starts a new clock and recipe, but its weights' embeddings still mean the old ids.
    with pytest.raises(CheckpointError, match=f"tokenizer {tokenizer} is not the one checkpoint ckpt.pt was"):
        _check_tokenizer(RunStart(StartKind.PHASE_CHANGE, "ckpt.pt", tokenizer_identity="x"), tokenizer)


def resumed_schedule(write_recipe, tmp_path, saved: dict, **changed):
    """A checkpoint at batch 4 saved by the recipe with `saved` merged in, and the config resuming it with
    `changed` merged in as well."""
    save_checkpoint(tmp_path / "run" / "ep0-ba4-rank0.pt", to_dict(load_config(write_recipe(**saved))))
    (tmp_path / "run" / "latest-rank0.pt").symlink_to("ep0-ba4-rank0.pt")
    return load_config(write_recipe(autoresume=True, **_merged(saved, changed)))


def _merged(saved: dict, changed: dict) -> dict:
    merged = {**saved}
    for key, value in changed.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and key in merged else value
    return merged


def test_a_longer_run_whose_decay_had_not_begun_resumes(write_recipe, tmp_path):
    # 12 batches, decaying over the last half from batch 6: at batch 4 the lr is still the peak, as it is
    # under 24 batches (the decay now from batch 12).
    config = resumed_schedule(
        write_recipe, tmp_path, {"scheduler": {"t_decay": "0.5dur"}}, max_duration="24ba"
    )
    assert decide_start(config).kind is StartKind.RESUME


def test_a_longer_run_whose_dur_relative_decay_had_begun_is_refused_in_one_line(write_recipe, tmp_path):
    # Decaying from batch 3 of 12: at batch 4 the multiplier is 1 - sqrt(1/9) = 0.667; with max_duration
    # 24ba the decay would start at batch 6 and the lr jump back to its peak.
    config = resumed_schedule(
        write_recipe, tmp_path, {"scheduler": {"t_decay": "0.75dur"}}, max_duration="24ba"
    )
    before = listing(tmp_path / "run")
    with pytest.raises(CheckpointError) as refused:
        decide_start(config)
    checkpoint = tmp_path / "run" / "ep0-ba4-rank0.pt"
    assert str(refused.value) == (
        f"schedule changed since checkpoint {checkpoint}: max_duration=12ba there, 24ba here; at its batch 4 "
        "the lr multiplier was 0.6667 and would jump to 1: put them back (a 'dur'-relative decay that has "
        "begun moves with max_duration), or set allow_schedule_change=true to change the lr there on purpose"
    )
    assert listing(tmp_path / "run") == before
    config.allow_schedule_change = True
    assert decide_start(config).kind is StartKind.RESUME


def test_a_new_scheduler_is_refused_where_it_changes_the_lr_and_allowed_where_it_does_not(
    write_recipe, tmp_path
):
    # Still warming up at batch 4 of an 8-batch warmup (multiplier 0.5): a shorter warmup jumps.
    saved = {"scheduler": {"t_warmup": "8ba"}}
    config = resumed_schedule(write_recipe, tmp_path, saved, scheduler={"t_warmup": "4ba"})
    with pytest.raises(CheckpointError, match=r"scheduler\.t_warmup=8ba there, 4ba here; at its batch 4 "):
        decide_start(config)
    # A decay added later, a constant scheduler instead of a flat wsd: the same lr at batch 4.
    shutil.rmtree(tmp_path / "run")
    config = resumed_schedule(write_recipe, tmp_path, {}, scheduler={"t_decay": "0.25dur"})
    assert decide_start(config).kind is StartKind.RESUME
    shutil.rmtree(tmp_path / "run")
    config = resumed_schedule(write_recipe, tmp_path, {}, scheduler={"name": "constant", "t_decay": None})
    assert decide_start(config).kind is StartKind.RESUME


def test_a_load_without_reset_time_has_its_schedule_checked(write_recipe, tmp_path):
    saved = to_dict(load_config(write_recipe(scheduler={"t_decay": "0.75dur"})))
    checkpoint = save_checkpoint(tmp_path / "other" / "ep0-ba4-rank0.pt", saved)
    load = load_config(write_recipe(load_path=str(checkpoint), max_duration="24ba"))  # t_decay back at 0ba
    refused = r"scheduler\.t_decay=0\.75dur there, 0ba here; at its batch 4 "
    with pytest.raises(CheckpointError, match=refused):
        decide_start(load)
    phase = load_config(write_recipe(load_path=str(checkpoint), max_duration="24ba", reset_time=True))
    assert decide_start(phase).kind is StartKind.PHASE_CHANGE


MIXED = {"schedule": "linear", "start": 0.3, "end": 0.1, "t_start": "2ba", "t_end": "4096tok"}


def test_the_batch_size_is_free_unless_the_masking_schedule_mixes_batches_with_rows(recipe):
    bigger = changed(recipe, global_train_batch_size=16, device_train_microbatch_size=2)
    assert recipe_changes(recipe, bigger) == ([], [])
    for masking in (
        {"schedule": "step", "values": [0.3, 0.2], "milestones": ["4096tok"]},  # rows only
        {"schedule": "linear", "start": 0.3, "end": 0.1, "t_start": "0ba", "t_end": "64sp"},  # 0 has no unit
        {"schedule": "step", "values": [0.3, 0.2], "milestones": ["0.5dur"]},  # max_duration 12ba: batches
    ):
        saved, resumed = (
            changed(recipe, data__mlm_probability=masking),
            changed(bigger, data__mlm_probability=masking),
        )
        assert recipe_changes(saved, resumed) == ([], []), masking
    refusal_of = (
        "{}={} there, {} here (data.mlm_probability mixes ba and sp/tok times: give them in one unit)"
    )
    for masking in (
        MIXED,
        {"schedule": "linear", "start": 0.3, "end": 0.1, "t_start": "64sp"},
    ):  # t_end 1dur = 12ba
        saved, resumed = (
            changed(recipe, data__mlm_probability=masking),
            changed(bigger, data__mlm_probability=masking),
        )
        assert recipe_changes(saved, resumed) == ([refusal_of.format("global_train_batch_size", 8, 16)], [])
    # the micro-batch size places the sizes of a batch-size warmup only
    mixed = changed(recipe, data__mlm_probability=MIXED)
    assert recipe_changes(mixed, changed(mixed, device_train_microbatch_size=2)) == ([], [])
    warm = changed(mixed, data__batch_size_warmup={"start": 2, "tokens": "4096tok"})
    refused, _ = recipe_changes(warm, changed(warm, device_train_microbatch_size=2))
    assert refused == [refusal_of.format("device_train_microbatch_size", "null", 2)]


def test_a_resume_changing_the_batch_size_under_a_mixed_masking_schedule_is_refused_in_one_line(
    write_recipe, tmp_path
):
    config = resumed_schedule(
        write_recipe, tmp_path, {"data": {"mlm_probability": MIXED}}, global_train_batch_size=16
    )
    before = listing(tmp_path / "run")
    with pytest.raises(CheckpointError) as refused:
        decide_start(config)
    checkpoint = tmp_path / "run" / "ep0-ba4-rank0.pt"
    assert str(refused.value) == (
        f"recipe changed since checkpoint {checkpoint}: global_train_batch_size=8 there, 16 here "
        "(data.mlm_probability mixes ba and sp/tok times: give them in one unit); a resumed run continues "
        "its optimizer, data stream and RNG, so these keys cannot change: put them back, or start a new "
        f"phase with load_path={checkpoint} reset_time=true (in another save_folder when autoresuming)"
    )
    assert listing(tmp_path / "run") == before
    shutil.rmtree(tmp_path / "run")
    rows = {"schedule": "linear", "start": 0.3, "end": 0.1, "t_end": "4096tok"}
    config = resumed_schedule(
        write_recipe, tmp_path, {"data": {"mlm_probability": rows}}, global_train_batch_size=16
    )
    assert decide_start(config).kind is StartKind.RESUME


def test_a_longer_run_whose_dur_relative_masking_ramp_had_begun_is_refused(write_recipe, tmp_path):
    # The masking ratio falls from 0.3 to 0.15 between 0.25dur and 0.5dur: batches 3 to 6 of 12, so 0.25 at
    # batch 4. Under 24 batches the ramp would start at batch 6: the ratio would jump back to 0.3.
    ramp = {"schedule": "linear", "start": 0.3, "end": 0.15, "t_start": "0.25dur", "t_end": "0.5dur"}
    config = resumed_schedule(
        write_recipe, tmp_path, {"data": {"mlm_probability": ramp}}, max_duration="24ba"
    )
    with pytest.raises(CheckpointError) as refused:
        decide_start(config)
    checkpoint = tmp_path / "run" / "ep0-ba4-rank0.pt"
    assert str(refused.value) == (
        f"masking schedule changed since checkpoint {checkpoint}: max_duration=12ba there, 24ba here; at its "
        "batch 4 the masking ratio was 0.25 and would jump to 0.3: put them back (a 'dur' time moves with "
        "max_duration), or set allow_schedule_change=true to change it there on purpose"
    )
    config.allow_schedule_change = True
    assert decide_start(config).kind is StartKind.RESUME
    # A ramp that had not begun moves later unchanged at batch 4; a ramp in batches does not move at all.
    for later in ({**ramp, "t_start": "0.5dur", "t_end": "1dur"}, {**ramp, "t_start": "3ba", "t_end": "6ba"}):
        shutil.rmtree(tmp_path / "run")
        config = resumed_schedule(
            write_recipe, tmp_path, {"data": {"mlm_probability": later}}, max_duration="24ba"
        )
        assert decide_start(config).kind is StartKind.RESUME
