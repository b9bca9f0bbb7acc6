"""modernbert-finetune: a tiny exported model learns a tiny task from JSONL/CSV/TSV; bad input is one line."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from modernbert_train.finetune import ModernBertForSequenceClassification
from modernbert_train.finetune.cli import cli
from modernbert_train.finetune.metrics import classification_scores, regression_scores
from modernbert_train.hf import to_hf
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

WORDS = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "sea", "sky"]
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    config = ModernBertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        global_attn_every_n_layers=2, local_attention=8, pad_token_id=0, cls_token_id=1, sep_token_id=2,
        mask_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    to_hf(ModernBertForMaskedLM(config), folder, tokenizer=tokenizer)
    return folder


def examples(n: int, seed: int) -> list[dict]:
    """Label: which of "red" or "blue" the sentence holds, among filler words."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        colour = str(rng.choice(["red", "blue"]))
        words = list(rng.choice(WORDS[2:], size=int(rng.integers(3, 8))))
        words.insert(int(rng.integers(0, len(words) + 1)), colour)
        rows.append(
            {
                "sentence": " ".join(words),
                "other": "sky sea",
                "colour": colour,
                "score": float(colour == "red"),
            }
        )
    return rows


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(
                file, fieldnames=list(rows[0]), delimiter="," if path.suffix == ".csv" else "\t"
            )
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.slow  # two seeds of four epochs: about 25 s of CPU
def test_finetune_learns_a_tiny_task_and_reports_every_epoch(model_dir, tmp_path, capsys):
    train = write(tmp_path / "train.jsonl", examples(96, seed=1))
    evaluation = write(tmp_path / "eval.csv", examples(40, seed=2))
    out = tmp_path / "out"
    cli([str(model_dir), "--train", str(train), "--eval", str(evaluation), "--output", str(out),
         "--text-field", "sentence", "--label-field", "colour", "--seeds", "0", "1", "--epochs", "4",
         "--lr", "3e-3", "--batch-size", "16"])  # fmt: skip
    assert "results.json: accuracy" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["init"] == "pretrained" and results["label_names"] == ["blue", "red"]
    assert [run["seed"] for run in results["runs"]] == [0, 1]
    for run in results["runs"]:
        assert [epoch["epoch"] for epoch in run["epochs"]] == [1, 2, 3, 4]
        assert run["epochs"][-1]["train_loss"] < run["epochs"][0]["train_loss"]
    assert results["final"]["accuracy"]["mean"] >= 0.9 and results["final"]["f1"]["mean"] >= 0.9


def test_regression_with_text_pairs_from_tsv_reports_correlations(model_dir, tmp_path):
    train = write(tmp_path / "train.tsv", examples(48, seed=3))
    out = tmp_path / "out"
    cli([str(model_dir), "--train", str(train), "--eval", str(train), "--output", str(out), "--task",
         "regression", "--text-field", "sentence", "--text-pair-field", "other", "--label-field", "score",
         "--epochs", "3", "--lr", "3e-3", "--random-init"])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["init"] == "random" and results["label_names"] is None
    assert set(results["runs"][0]["epochs"][0]) == {"epoch", "train_loss", "pearson", "spearman"}
    assert results["final"]["pearson"]["mean"] > 0.5


def test_a_packed_batch_classifies_each_example_as_alone(model_dir):
    from modernbert_train.hf import from_hf

    torch.manual_seed(0)
    model = ModernBertForSequenceClassification(from_hf(model_dir), num_labels=3).eval()
    first, second = torch.tensor([1, 5, 6, 7, 2]), torch.tensor([1, 8, 9, 2])
    together = model(torch.cat([first, second]), torch.tensor([0, 5, 9], dtype=torch.int32), 5)
    alone = [model(ids, torch.tensor([0, len(ids)], dtype=torch.int32), len(ids)) for ids in (first, second)]
    torch.testing.assert_close(together, torch.cat(alone))


def test_scores_match_hand_computed_values():
    scores = classification_scores(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), num_classes=3)
    # class 0: tp 1, guessed 2, actual 2 -> 0.5; class 1: tp 2, 2, 3 -> 0.8; class 2: 0
    assert scores == pytest.approx({"accuracy": 0.6, "f1": (0.5 + 0.8 + 0.0) / 3})
    # Ranks with a tie: predicted [1, 2, 2, 3] -> [1, 2.5, 2.5, 4]; labels' ranks [1, 2, 3, 4].
    correlations = regression_scores(np.array([1.0, 2.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0, 40.0]))
    assert correlations["pearson"] == pytest.approx(np.corrcoef([1, 2, 2, 3], [10, 20, 30, 40])[0, 1])
    assert correlations["spearman"] == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])


GOOD = '{"text": "red cat", "label": "a"}\n{"text": "blue dog", "label": "b"}\n'


@pytest.mark.parametrize(
    "name, content, flags, expected",
    [
        ("t.jsonl", GOOD + "{oops\n", [], "t.jsonl:3: not JSON"),
        ("t.jsonl", GOOD + '{"text": "sea"}\n', [], "t.jsonl:3: no field 'label'"),
        (
            "t.jsonl",
            GOOD + '{"text": 5, "label": "a"}\n',
            [],
            "t.jsonl:3: field 'text' is int, expected text",
        ),
        (
            "t.jsonl",
            GOOD + '{"text": "sea", "label": "a"}\n',
            ["--text-pair-field", "p"],
            "t.jsonl:1: no field 'p'",
        ),
        ("t.jsonl", GOOD, ["--task", "regression"], "t.jsonl:1: label 'a' is not a number"),
        ("t.jsonl", GOOD.replace('"b"', '"a"'), [], "every example has label 'a'"),
        ("t.jsonl", "", [], "t.jsonl: no examples"),
        ("t.csv", "text,label\nred cat,a\nblue dog,b,extra\n", [], "t.csv:3: more columns than the header"),
        ("t.txt", "red cat\n", [], "unknown format '.txt'"),
        ("t.jsonl", GOOD, ["--epochs", "0"], "--epochs must be at least 1"),
        ("t.jsonl", GOOD.encode() + b'{"text": "caf\xe9", "label": "a"}\n', [], "t.jsonl:3: not UTF-8 text"),
        ("t.csv", b"text,label\nred,a\nblue,b\n\xff\n", [], "t.csv:4: not UTF-8 text (byte 0xff)"),
        (
            "t.jsonl",
            '{"text": "red", "label": 1.5}\n{"text": "blue", "label": "inf"}\n',
            ["--task", "regression"],
            "t.jsonl:2: label 'inf' is not a finite number",
        ),
        (
            "t.tsv",
            "text\tlabel\nred\t0.5\nblue\tNaN\n",
            ["--task", "regression"],
            "t.tsv:3: label 'NaN' is not",
        ),
        ("t.jsonl", GOOD, ["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
        ("t.jsonl", GOOD, ["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
        ("t.jsonl", GOOD, ["--warmup-ratio", "-2"], "--warmup-ratio must be in [0, 1], got -2.0"),
        ("t.jsonl", GOOD, ["--weight-decay", "-1"], "--weight-decay must be finite and at least 0, got -1.0"),
        ("t.jsonl", GOOD, ["--weight-decay", "inf"], "--weight-decay must be finite and at least 0, got inf"),
        ("t.jsonl", GOOD, ["--weight-decay", "nan"], "--weight-decay must be finite and at least 0, got nan"),
        ("t.jsonl", GOOD, ["--lr", "inf"], "--lr must be a positive finite number, got inf"),
        ("t.jsonl", GOOD, ["--lr", "nan"], "--lr must be a positive finite number, got nan"),
        ("t.jsonl", GOOD, ["--dropout", "nan"], "--dropout must be in [0, 1), got nan"),
        # A quote left open in a CSV: the file and the line it opens on, not a "missing" label field.
        (
            "t.csv",
            'text,label\nred,a\n"blue,b\ngreen,a\nsea,b\n',
            [],
            "t.csv:3: a quoted field in the record starting here is never closed",
        ),
        ("t.csv", 'text,label\nred,a\n"blue"x,b\n', [], "t.csv:3: ',' expected after '\"'"),
        # Line numbers count blank lines and the lines of a quoted cell that spans several.
        ("t.csv", 'text,label\n"red\ncat",a\n\n\nblue,b,x\n', [], "t.csv:6: more columns than the header"),
        ("t.csv", "text,label\nred,a\nblue, \n", [], "t.csv:3: label ' ' is blank"),
        ("t.jsonl", GOOD, ["--seeds", "0", "-1"], "--seeds must be non-negative integers, got [0, -1]"),
        ("t.jsonl", GOOD, ["--device", "tpu"], "--device must be auto, cpu or cuda, got 'tpu'"),
    ],
)
def test_bad_input_is_a_one_line_error(model_dir, tmp_path, capsys, name, content, flags, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as exit:
        cli([str(model_dir), "--train", str(tmp_path / name), "--eval", str(tmp_path / name), "--output",
             str(tmp_path / "out"), *flags])  # fmt: skip
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and len(error.splitlines()) == 1, error
    assert not (tmp_path / "out" / "results.json").exists()


def test_eval_labels_unseen_in_training_and_missing_models_are_one_line_errors(model_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text(GOOD)
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(GOOD + '{"text": "sky", "label": "c"}\n')
    cases = ((model_dir, evaluation, "eval.jsonl:3: label 'c' does not occur in the training file"),
             (tmp_path, train, "no config.json"))  # fmt: skip
    for model, eval_file, expected in cases:
        with pytest.raises(SystemExit):
            cli(
                [str(model), "--train", str(train), "--eval", str(eval_file), "--output", str(tmp_path / "o")]
            )
        error = capsys.readouterr().err.strip()
        assert expected in error and len(error.splitlines()) == 1, error


def test_embedded_task_is_fixed_balanced_and_splits_by_file(tmp_path):
    from modernbert_train.finetune.stdlib_task import PACKAGES, PER_CLASS, build_task

    first, again = build_task(tmp_path / "a"), build_task(tmp_path / "b")
    rows = {}
    for split in ("train", "eval"):
        assert first[split].read_bytes() == again[split].read_bytes()
        rows[split] = [json.loads(line) for line in first[split].read_text().splitlines()]
        labels = [row["label"] for row in rows[split]]
        assert {label: labels.count(label) for label in PACKAGES} == dict.fromkeys(PACKAGES, PER_CLASS[split])
    assert not {row["text"] for row in rows["train"]} & {row["text"] for row in rows["eval"]}


def test_keyword_task_is_fixed_balanced_and_blanks_only_code(tmp_path):
    """The default embedded task: 14 balanced classes; every example blanks exactly one code keyword (never a
    word in a string or comment) with the mask token; the eval split's files are not the train split's."""
    from modernbert_train.finetune import keyword_task

    paths = keyword_task.build_task(tmp_path / "a", mask_token="<blank>")
    rows = {}
    for split in ("train", "eval"):
        rows[split] = [json.loads(line) for line in paths[split].read_text().splitlines()]
        labels = [row["label"] for row in rows[split]]
        assert {label: labels.count(label) for label in keyword_task.KEYWORDS} == dict.fromkeys(
            keyword_task.KEYWORDS, keyword_task.PER_CLASS[split]
        )
        assert all(row["text"].count("<blank>") == 1 for row in rows[split])
        assert all(len(row["text"].splitlines()) == 5 for row in rows[split])
    assert not {row["text"] for row in rows["train"]} & {row["text"] for row in rows["eval"]}
    # The eval split is code the default corpus never pretrains on, not even as a copy in another module.
    from data_prep.default_corpus import DEFAULT_MAX_BYTES, select_files

    pretraining = "\n".join(
        item.path.read_text(errors="replace")
        for item in select_files(DEFAULT_MAX_BYTES)
        if item.source == "python-stdlib"
    )
    assert not [row for row in rows["eval"] if row["text"].replace("<blank>", row["label"]) in pretraining]
    # The same files again (a small sample rebuilt: the whole build reads the stdlib once).
    stdlib = Path(keyword_task.sysconfig.get_paths()["stdlib"])
    files = keyword_task.stdlib_files(stdlib)[:40]
    first = [
        keyword_task.examples(keyword_task.read_source(f), np.random.default_rng(0), "<blank>") for f in files
    ]
    again = [
        keyword_task.examples(keyword_task.read_source(f), np.random.default_rng(0), "<blank>") for f in files
    ]
    assert first == again

    source = "x = 'if in a string'  # and in a comment\nif x is None:\n    y = [v for v in x]\n"
    found = keyword_task.keyword_positions(source)
    keywords = {line: [k for *_, k in hits] for line, hits in found.items()}
    assert keywords == {1: ["if", "is", "None"], 2: ["for", "in"]}


@pytest.mark.slow  # builds the keyword task from the whole stdlib (about 20 s), then fine-tunes twice
def test_make_eval_writes_both_scores_with_the_models_own_mask_token(model_dir, tmp_path, capsys):
    from modernbert_train.finetune import embedded_eval

    output = tmp_path / "eval.json"
    embedded_eval.evaluate(model_dir, output, "keyword", settings={"seeds": [0], "epochs": 1})
    summary = json.loads(output.read_text())
    assert summary["task"] == "keyword" and summary["settings"]["seeds"] == [0]
    assert 0 <= summary["pretrained"] <= 1 and 0 <= summary["random_init"] <= 1
    assert set(summary["scores"]) == {"pretrained", "random_init"}
    assert summary["margin"] == pytest.approx(summary["pretrained"] - summary["random_init"])
    assert summary["clear_win"] == (summary["margin"] > summary["margin_needed"] >= 0.05)
    first = json.loads((tmp_path / "eval" / "task-keyword" / "train.jsonl").read_text().splitlines()[0])
    assert first["text"].count("[MASK]") == 1  # the fixture tokenizer's mask token (id 3)

    with pytest.raises(SystemExit):
        embedded_eval.main([str(tmp_path / "nowhere"), "--output", str(output)])
    error = capsys.readouterr().err.strip()
    assert "nowhere" in error and len(error.splitlines()) == 1, error


def test_make_eval_fails_loudly_when_pretraining_did_not_clearly_help(
    model_dir, tmp_path, capsys, monkeypatch, s3_bucket
):
    from modernbert_train import storage
    from modernbert_train.finetune import embedded_eval

    evaluated = []

    def tie(model_dir, output, task_name, settings=None, shown=""):  # as a random "pretrained" model scores
        evaluated.append((sorted(p.name for p in Path(model_dir).iterdir()), shown))
        summary = {"pretrained": 0.30, "random_init": 0.29, "std": {"pretrained": 0.02, "random_init": 0.01},
                   "margin": 0.01, "margin_needed": 0.05, "clear_win": False, "seconds": 1.0}  # fmt: skip
        output.write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(embedded_eval, "evaluate", tie)
    with pytest.raises(SystemExit) as exit:
        embedded_eval.main([str(model_dir), "--output", str(tmp_path / "eval.json")])
    assert exit.value.code == 1
    captured = capsys.readouterr()
    assert "wrote" in captured.out and (tmp_path / "eval.json").is_file()
    assert captured.err.strip() == (
        "embedded_eval: error: pretraining did not clearly help: 0.3000 vs random init 0.2900, a margin of "
        "+0.0100 where 0.0500 is needed (train longer, or check the run's eval loss)"
    )
    # A model in a bucket is fetched first; the output must be local (the task's folder goes beside it).
    remote = storage.join(s3_bucket, "hf")
    storage.upload_folder(model_dir, remote)
    with pytest.raises(SystemExit):
        embedded_eval.main([remote, "--output", str(tmp_path / "eval.json")])
    assert evaluated[-1] == (sorted(p.name for p in Path(model_dir).iterdir()), remote)
    with pytest.raises(SystemExit) as exit:
        embedded_eval.main([remote, "--output", storage.join(s3_bucket, "eval.json")])
    assert exit.value.code == 2 and "a local file (the task's work folder" in capsys.readouterr().err


def test_output_that_is_a_file_is_refused_before_training(model_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text(GOOD)
    taken = tmp_path / "taken"
    taken.write_text("someone's file")
    with pytest.raises(SystemExit) as exit:
        cli([str(model_dir), "--train", str(train), "--eval", str(train), "--output", str(taken)])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == f"modernbert-finetune: error: --output {taken}: is a file; name a folder for results.json"
    assert taken.read_text() == "someone's file"
    # Under a file; and a run refused for its input leaves no empty --output folder behind.
    with pytest.raises(SystemExit):
        cli([str(model_dir), "--train", str(train), "--eval", str(train), "--output", str(taken / "x")])
    assert f"--output {taken / 'x'}: cannot create it: {taken} is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli([str(model_dir), "--train", str(tmp_path / "missing.jsonl"), "--eval", str(train),
             "--output", str(tmp_path / "new" / "out")])  # fmt: skip
    assert "missing.jsonl" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_tsv_is_unquoted_csv_is_quoted_and_a_byte_order_mark_is_dropped(tmp_path):
    from modernbert_train.finetune.data import read_examples

    # GLUE's TSVs are unquoted: a sentence may open with a quotation mark, or hold one that never closes.
    tsv = tmp_path / "glue.tsv"
    tsv.write_text('sentence\tlabel\n"Hello," he said.\t1\nan "open quote\t0\nlast one\t1\n')
    examples = read_examples(tsv, "sentence", "label")
    assert examples.texts == ['"Hello," he said.', 'an "open quote', "last one"]
    assert examples.labels == [1, 0, 1] and examples.label_names == ["0", "1"]
    csv_file = tmp_path / "excel.csv"
    csv_file.write_bytes('\ufefftext,label\n"red, or not",-1\nblue,10\ngreen,2\n'.encode())
    examples = read_examples(csv_file, "text", "label")
    assert examples.texts == ["red, or not", "blue", "green"]
    assert examples.label_names == ["-1", "2", "10"]  # integers sort as numbers
    csv_file.write_text("text,label\nred,--1\nblue,1\n")
    assert read_examples(csv_file, "text", "label").label_names == ["--1", "1"]  # not integers: as text


def test_model_data_and_results_in_a_bucket(model_dir, tmp_path, s3_bucket, capsys):
    from modernbert_train import storage

    remote_model = storage.join(s3_bucket, "models", "tiny")
    storage.upload_folder(model_dir, remote_model)
    train = storage.join(s3_bucket, "data", "train.jsonl")
    storage.write_text(train, GOOD * 4)
    out = storage.join(s3_bucket, "finetune", "tiny")
    cli(
        [
            remote_model,
            "--train",
            train,
            "--eval",
            train,
            "--output",
            out,
            "--epochs",
            "1",
            "--batch-size",
            "4",
        ]
    )
    assert f"wrote {out}/results.json" in capsys.readouterr().out
    results = json.loads(storage.read_text(storage.join(out, "results.json")))
    assert results["model"] == remote_model and results["examples"] == {"train": 8, "eval": 8}
    assert results["device"] == "cpu" and len(results["runs"][0]["epochs"]) == 1
    with pytest.raises(SystemExit):
        cli([storage.join(s3_bucket, "models", "none"), "--train", train, "--eval", train, "--output", out])
    error = capsys.readouterr().err.strip()
    missing = f"{s3_bucket}/models/none"
    assert (
        error
        == f"modernbert-finetune: error: {missing}: no config.json (expected an exported ModernBERT folder)"
    )


def run_cli(capsys, model, train, output, *flags) -> tuple[int, str]:
    """(exit code, stderr) of modernbert-finetune; stderr must be one line when it fails."""
    try:
        cli([str(model), "--train", str(train), "--eval", str(train), "--output", str(output), *flags])
    except SystemExit as exit:
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1, error
        return exit.code, error
    return 0, capsys.readouterr().err


def test_diverging_training_is_an_error_not_a_score(model_dir, tmp_path, capsys, monkeypatch):
    """A learning rate that blows the loss up used to be scored (argmax of NaN logits is class 0) and left
    "train_loss": NaN, invalid JSON, in results.json."""
    from modernbert_train.finetune import train as train_module

    data = write(tmp_path / "train.jsonl", examples(32, seed=1))
    flags = ("--text-field", "sentence", "--label-field", "colour", "--epochs", "2", "--batch-size", "8")
    code, error = run_cli(capsys, model_dir, data, tmp_path / "out", *flags, "--lr", "1e4")
    assert code == 2
    assert error.startswith("modernbert-finetune: error: seed 0, epoch 1, step "), error
    assert "the training loss is nan" in error and "try a lower --lr than 10000" in error
    assert not (tmp_path / "out").exists()
    # A finite loss but outputs that are not (weights gone bad in the epoch's last steps): an error too.
    monkeypatch.setattr(
        train_module, "predict", lambda model, sequences, *_: np.full((len(sequences), 2), np.nan, np.float32)
    )
    code, error = run_cli(capsys, model_dir, data, tmp_path / "out", *flags, "--lr", "1e-3")
    assert code == 2 and "seed 0, epoch 1: the model's outputs on --eval are not finite" in error, error
    assert not (tmp_path / "out").exists()


def test_constant_predictions_have_no_correlation_and_results_stay_valid_json(
    model_dir, tmp_path, capsys, monkeypatch
):
    """A regressor that collapsed to one value scored 0.0 (a weak correlation, seemingly); scipy says NaN."""
    from modernbert_train.finetune import train as train_module

    constant = regression_scores(np.full(4, 0.5), np.array([1.0, 2.0, 3.0, 4.0]))
    assert np.isnan(constant["pearson"]) and np.isnan(constant["spearman"])
    monkeypatch.setattr(
        train_module, "predict", lambda model, sequences, *_: np.full((len(sequences), 1), 0.5, np.float32)
    )
    data = write(tmp_path / "train.jsonl", examples(16, seed=3))
    cli([str(model_dir), "--train", str(data), "--eval", str(data), "--output", str(tmp_path / "out"),
         "--task", "regression", "--text-field", "sentence", "--label-field", "score", "--epochs", "1",
         "--seeds", "0", "1"])  # fmt: skip
    out = capsys.readouterr().out.strip()
    assert "pearson nan ± nan, spearman nan ± nan (2 seed(s)); pearson and spearman nan: " in out, out
    assert out.endswith("(a collapsed regressor)")

    def strict(constant):
        raise AssertionError(f"results.json holds a bare {constant}, not JSON")

    results = json.loads((tmp_path / "out" / "results.json").read_text(), parse_constant=strict)
    assert results["final"]["pearson"] == {"mean": "nan", "std": "nan"}  # as metrics.jsonl writes NaN
    assert results["runs"][1]["epochs"][0]["spearman"] == "nan"


def test_seed_spread_is_the_sample_standard_deviation():
    from modernbert_train.finetune.train import summarise

    runs = [{"seed": i, "epochs": [{"epoch": 1, "train_loss": 0.1, "accuracy": a}]} for i, a in
            enumerate([0.65, 0.58, 0.79])]  # fmt: skip
    assert summarise(runs)["accuracy"]["std"] == pytest.approx(np.std([0.65, 0.58, 0.79], ddof=1))
    assert summarise(runs)["accuracy"]["std"] == pytest.approx(0.10693, abs=1e-5)  # population: 0.0873
    assert summarise(runs[:1])["accuracy"] == {"mean": 0.65, "std": 0.0}


def test_labels_with_surrounding_spaces_are_one_class(tmp_path):
    from modernbert_train.finetune.data import read_examples

    train = tmp_path / "train.csv"
    train.write_text("text,label\nred,neg \nblue,neg\nsea,pos\nsky, pos\n")
    examples_read = read_examples(train, "text", "label")
    assert examples_read.label_names == ["neg", "pos"] and examples_read.labels == [0, 0, 1, 1]
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text('{"text": "red", "label": "neg  "}\n{"text": "sky", "label": "pos"}\n')
    assert read_examples(evaluation, "text", "label", label_names=["neg", "pos"]).labels == [0, 1]


@pytest.fixture
def wide_tokenizer_model(model_dir, tmp_path):
    """The tiny model (vocab_size=64) holding an 8192-token tokenizer.json: ids past its embedding table."""
    import shutil

    folder = tmp_path / "wide-model"
    shutil.copytree(model_dir, folder)
    words = [f"w{i}" for i in range(8192 - len(SPECIALS) - len(WORDS))]
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_a_tokenizer_wider_than_the_models_vocabulary_is_refused_before_any_work(
    wide_tokenizer_model, tmp_path, capsys, monkeypatch
):
    from modernbert_train.finetune import embedded_eval, stdlib_task

    data = write(tmp_path / "train.jsonl", examples(8, seed=1))
    code, error = run_cli(capsys, wide_tokenizer_model, data, tmp_path / "out", "--text-field", "sentence",
                          "--label-field", "colour", "--epochs", "1")  # fmt: skip
    expected = f"{wide_tokenizer_model}: tokenizer: its 8192 tokens do not fit the model's vocab_size=64"
    assert code == 2 and error.startswith(f"modernbert-finetune: error: {expected}"), error
    assert not (tmp_path / "out").exists()
    # make eval: refused before its task is built (that used to leave a half-built work folder behind).
    monkeypatch.setattr(stdlib_task, "build_task", lambda folder: pytest.fail("built the task"))
    for task in ("package", "keyword"):
        with pytest.raises(SystemExit) as exit:
            embedded_eval.main(
                [str(wide_tokenizer_model), "--task", task, "--output", str(tmp_path / "e.json")]
            )
        error = capsys.readouterr().err.strip()
        assert exit.value.code == 2 and error == f"embedded_eval: error: {expected}; export the tokenizer " \
            "the model was trained with", error  # fmt: skip
        assert not (tmp_path / "e").exists() and not (tmp_path / "e.json").exists()
