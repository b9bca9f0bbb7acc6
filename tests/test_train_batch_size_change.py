"""A real run autoresumed with another global_train_batch_size and device_train_microbatch_size (free keys),
inside a batch-size warmup and outside one: it trains exactly the batches the data pipeline makes from the
checkpoint's data state (test_data_batch_size_change.py shows those read every chunk once), at the recipe's
sizes from the rows really trained; Composer's sample and token clock, a token-based lr warmup and a masking
schedule in samples follow what was trained."""

import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
from conftest import REPO, read_metrics, run_env

from data_prep.inspect_shards import iter_samples
from modernbert_train.data.chunking import chunk_bounds
from modernbert_train.train.config import load_config
from modernbert_train.train.data import build_data

pytestmark = pytest.mark.slow

# The training CLI with each trained batch (as the trainer got it) appended to $TRACE as one JSON line.
TRACED_TRAIN = textwrap.dedent(
    """
    import json, os, sys
    from modernbert_train.train import data_state
    from modernbert_train.train.main import main

    observe = data_state.ObserveDataState.after_dataloader

    def traced(self, state, logger):
        batch = state.batch
        row = {key: batch[key].tolist() for key in ("input_ids", "labels", "attention_mask", "seq_lens")}
        row["mlm_probability"] = batch["pack_state"]["mlm_probability"]
        with open(os.environ["TRACE"], "a") as f:
            f.write(json.dumps(row) + "\\n")
        observe(self, state, logger)

    data_state.ObserveDataState.after_dataloader = traced
    main(sys.argv[1:])
    """
)
LR, LR_WARMUP_TOKENS, MASKING_STEP_ROWS = 3e-3, 1500, 60


def traced_run(script, recipe, trace, *overrides: str) -> None:
    done = subprocess.run(
        [sys.executable, str(script), str(recipe), *overrides], cwd=REPO, env=run_env(TRACE=str(trace)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"training failed ({done.returncode}):\n{done.stderr[-5000:]}"
    assert "Traceback" not in done.stderr


def pipeline_batches(recipe, overrides: list[str], count: int, state: dict | None = None) -> list[dict]:
    """The first `count` batches the data pipeline of `recipe` makes (from a checkpoint's data state)."""
    loader = build_data(load_config(recipe, overrides)).train_loader
    loader.dataset.load_state_dict(state)
    batches = []
    for batch in loader:
        loader.dataset.observe(batch)
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise AssertionError("the epoch ended early")


def pieces(batch: dict) -> list[tuple[int, ...]]:
    """The unmasked tokens of each chunk in a batch, without [CLS] and [SEP]."""
    ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
    tokens = torch.where(labels == -100, ids, labels).tolist()
    found = []
    for row, lens in zip(tokens, batch["seq_lens"]):
        start = 0
        for n in filter(None, lens):
            found.append(tuple(row[start + 1 : start + n - 1]))
            start += n
    return found


def warmup_rows(rows_trained: int, start: int, tokens: int, global_rows: int, increment: int) -> int:
    fraction = min(rows_trained * 64 / tokens, 1.0)
    return min(
        max(int(start + (global_rows - start) * fraction) // increment * increment, increment), global_rows
    )


@pytest.mark.parametrize(
    ("first", "then", "warmup"),
    [
        # 8 batches of 2 rows (global 4 ramps from 2 to 4 over 64 rows), then global 16: from 16 rows trained
        # the ramp goes 4, 6, 6, ... (before the data state counted rows it jumped to 6, 8, 8, ...)
        ({"global_train_batch_size": 4, "device_train_microbatch_size": 2}, {"global_train_batch_size": 16},
         {"start": 2, "tokens": "4096tok"}),
        # 8 batches of 8 rows in micro-batches of 4, then batches of 4 rows in micro-batches of 1
        ({"global_train_batch_size": 8, "device_train_microbatch_size": 4},
         {"global_train_batch_size": 4, "device_train_microbatch_size": 1}, None),
    ],
    ids=["larger-in-warmup", "smaller-and-micro"],
)  # fmt: skip
def test_a_resume_with_another_batch_size_trains_what_the_recipe_says(
    write_recipe, tmp_path, tiny_data, first, then, warmup
):
    script = tmp_path / "traced_train.py"
    script.write_text(TRACED_TRAIN)
    data = {
        "eval": [],
        "mlm_probability": {
            "schedule": "step",
            "values": [0.4, 0.2],
            "milestones": [f"{MASKING_STEP_ROWS}sp"],
        },
    }
    if warmup:
        data["batch_size_warmup"] = warmup
    recipe = write_recipe(
        max_duration="8ba", save_interval="8ba", autoresume=True, data=data,
        scheduler={"t_warmup": f"{LR_WARMUP_TOKENS}tok", "t_decay": "0ba"}, **first,
    )  # fmt: skip
    trace = tmp_path / "trace.jsonl"
    traced_run(script, recipe, trace)
    later = ["max_duration=16ba", *(f"{key}={value}" for key, value in then.items())]
    traced_run(script, recipe, trace, *later)

    trained = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(trained) == 16
    sizes = [len(batch["input_ids"]) for batch in trained]
    # the sizes: the first recipe's for 8 batches, then the second's from the rows trained
    second = {**first, **then}
    rows, expected = 0, []
    for k in range(16):
        recipe_now = first if k < 8 else second
        size = recipe_now["global_train_batch_size"]
        if warmup:
            size = warmup_rows(rows, warmup["start"], 4096, size, recipe_now["device_train_microbatch_size"])
        expected.append(size)
        rows += size
    assert sizes == expected
    if warmup:
        assert expected[8:] == [4, 6, 6, 8, 10, 12, 14, 16]

    # exactly the batches the data pipeline makes: from the start, then from the checkpoint's data state
    checkpoint = torch.load(tmp_path / "run" / "ep0-ba8-rank0.pt", map_location="cpu", weights_only=False)
    state = checkpoint["state"]["dataset_state"]["train"]
    made = pipeline_batches(recipe, [], 8) + pipeline_batches(recipe, later, 8, state)
    for k, (ours, theirs) in enumerate(zip(trained, made)):
        assert ours["input_ids"] == theirs["input_ids"].tolist(), k
        assert ours["labels"] == theirs["labels"].tolist(), k
    # no chunk trained more often than the corpus holds it (its small grammar repeats a few)
    corpus = Counter(
        tuple(sample["input_ids"][a:b].tolist())
        for sample in iter_samples(tiny_data / "train")
        for a, b in chunk_bounds(len(sample["input_ids"]), 64)
    )
    seen = Counter(piece for batch in trained for piece in pieces(batch))
    assert not seen - corpus

    # Composer's clock counts what was trained; the lr warms up over those tokens; masking steps at 60 rows
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["batch"] for row in metrics] == list(range(1, 17))
    tokens = torch.tensor([sum(map(sum, batch["attention_mask"])) for batch in trained]).cumsum(0).tolist()
    assert [row["samples"] for row in metrics] == torch.tensor(sizes).cumsum(0).tolist()
    assert [row["tokens"] for row in metrics] == tokens
    for row, tokens_before in zip(metrics, [0, *tokens[:-1]]):  # the lr of the tokens before the batch
        assert row["lr-StableAdamW/group0"] == pytest.approx(LR * min(tokens_before / LR_WARMUP_TOKENS, 1.0))
    rows_before = [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]
    ratios = [0.4 if before < MASKING_STEP_ROWS else 0.2 for before in rows_before]
    assert [batch["mlm_probability"] for batch in trained] == ratios
    assert ratios[:8] == [0.4] * 8 and ratios[-1] == 0.2  # the step comes after the resume
