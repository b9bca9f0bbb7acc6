"""modernbert-report: metrics.jsonl files of several runs -> one picture; bad files get one-line errors."""

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from modernbert_train import storage
from modernbert_train.report import auto_smoothing, build_figure, cli, ema, read_run


def write_run(folder, name, rows_count=60, tokens_per_batch=4096, extra=None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"run_name: {name}\nseed: 1\n")
    rows = []
    for step in range(1, rows_count + 1):
        row = {
            "batch": step,
            "samples": 32 * step,
            "tokens": tokens_per_batch * step,
            "loss/train/total": 9.0 * math.exp(-step / 20) + 2.0,
            "lr-StableAdamW/group0": 1e-3 * min(1.0, step / 10),
            "lr-StableAdamW/group1": 1e-3 * min(1.0, step / 10),
            "throughput/device/tokens_per_sec": 9000.0 + step,
            "throughput/device/mfu": 0.4,
            "time/data_wait": 0.01,
        }
        if step % 20 == 0:
            row["metrics/eval/MLMLoss"] = 3.0 - step / 100
            row["metrics/eval/MLMAccuracy"] = step / 200
        row.update(extra or {})
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_report_overlays_runs_with_every_logged_panel(tmp_path, capsys):
    first = write_run(tmp_path / "a", "baseline")
    second = write_run(
        tmp_path / "b", "bigger-batch", tokens_per_batch=8192, extra={"data/mlm_probability": 0.3}
    )
    out = tmp_path / "plots" / "report.png"
    cli([str(first), str(second / "metrics.jsonl"), "--output", str(out), "--log-x"])
    printed = capsys.readouterr().out
    for title in ("train loss", "eval loss", "eval accuracy", "learning rate", "masking ratio", "tokens/s",
                  "MFU", "data wait"):  # fmt: skip
        assert title in printed
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 1000
    assert image.std() > 0.05  # something was drawn, not a blank canvas


def test_every_panel_has_a_named_line_for_each_run(tmp_path):
    runs = [read_run(str(write_run(tmp_path / name, name))) for name in ("first", "second")]
    figure, titles = build_figure(runs, smoothing=None, log_x=False)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == titles and len(titles) == 7  # no masking ratio logged
    for ax in panels:
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert [label.split()[0] for label in labels] == ["first", "second"], (ax.get_title(), labels)
        # each run's line covers its rows: 60 logged points, or 3 for the eval panels
        named = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert [len(line.get_xdata()) for line in named] == [3, 3] if "eval" in ax.get_title() else [60, 60]


def test_runs_in_a_bucket_are_read_and_named(tmp_path, s3_bucket, capsys):
    local = write_run(tmp_path / "local", "on-disk")
    remote = storage.join(s3_bucket, "runs", "cloud")
    storage.upload_folder(write_run(tmp_path / "up", "in-bucket"), remote)
    run = read_run(remote)
    assert run.name == "in-bucket" and run.source == f"{remote}/metrics.jsonl" and len(run.rows) == 60
    assert read_run(f"{remote}/metrics.jsonl").rows == run.rows
    out = tmp_path / "both.png"
    cli([str(local), remote, "--output", str(out)])
    assert "2 run(s)" in capsys.readouterr().out and out.is_file()
    cli([str(local), remote, "--output", storage.join(remote, "report.png")])  # the picture into the bucket
    assert storage.read_bytes(storage.join(remote, "report.png"))[:8] == b"\x89PNG\r\n\x1a\n"

    storage.remove(storage.join(remote, "config.yaml"))
    assert read_run(remote).name == "cloud"  # the folder's name, as for a local run
    with pytest.raises(SystemExit) as exit_:
        cli([storage.join(s3_bucket, "runs", "nowhere"), "--output", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    missing = f"{s3_bucket}/runs/nowhere/metrics.jsonl"
    assert (
        err
        == f"modernbert-report: error: {missing}: no such file (expected a run folder holding metrics.jsonl)"
    )


def test_read_run_names_the_run_and_skips_blank_lines(tmp_path):
    folder = write_run(tmp_path / "r", "my-run", rows_count=5)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("\n\n".join(lines) + "\n\n")  # blank lines are skipped
    run = read_run(str(folder))
    assert run.name == "my-run" and run.x_key == "tokens"
    assert [row["batch"] for row in run.rows] == [1, 2, 3, 4, 5]
    # A run killed while writing a row leaves it cut short, last and unterminated: skipped, as the run's next
    # start drops it (a bad line elsewhere, or a whole last line, is still an error).
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:15])
    assert [row["batch"] for row in read_run(str(folder)).rows] == [1, 2, 3, 4, 5]


def test_ema_is_bias_corrected_and_auto_smoothing_follows_length():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([0.0, 10.0], 0.5) == pytest.approx([0.0, 5 / 0.75])
    assert auto_smoothing(10) == 0.0
    assert 0.9 < auto_smoothing(3000) < 1.0


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"batch": 1, "tokens": 5}\nnot json\n', "metrics.jsonl:2: not JSON"),
        ('{"batch": 1, "tokens": 5}\n[1, 2]\n', "metrics.jsonl:2: expected a JSON object"),
        ('{"loss/train/total": 1.0}\n', "lack a numeric 'tokens', 'samples' or 'batch'"),
        ("", "no metrics logged yet"),
    ],
)
def test_bad_metrics_file_is_a_one_line_error(tmp_path, capsys, content, expected):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(SystemExit) as exit:
        cli([str(tmp_path), "--output", str(tmp_path / "r.png")])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and len(error.splitlines()) == 1
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"batch": 1, "tokens": 5}\n{"batch": 2, "note": "\xff"}\n', "metrics.jsonl:2: not UTF-8 text"),
        (  # the logger writes non-finite values as strings: a run with nothing finite has nothing to draw
            b'{"batch": 1, "tokens": 5, "loss/train/total": "nan", "non_finite": ["loss/train/total"]}\n',
            "no finite value of any plotted metric to draw",
        ),
    ],
)
def test_undrawable_metrics_are_a_one_line_error(tmp_path, capsys, content, expected):
    (tmp_path / "metrics.jsonl").write_bytes(content)
    with pytest.raises(SystemExit) as exit:
        cli([str(tmp_path), "--output", str(tmp_path / "r.png")])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and len(error.splitlines()) == 1, error
    assert not (tmp_path / "r.png").exists()


def test_missing_run_and_bad_smoothing_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli([str(tmp_path / "nowhere"), "--output", str(tmp_path / "r.png")])
    assert exit.value.code == 2
    assert "nowhere: no such file" in capsys.readouterr().err
    write_run(tmp_path / "ok", "ok", rows_count=3)
    with pytest.raises(SystemExit) as exit:
        cli([str(tmp_path / "ok"), "--output", str(tmp_path / "r.png"), "--smoothing", "1.5"])
    assert exit.value.code == 2
    assert "--smoothing must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "output, expected",
    [
        ("r.txt", "name a picture file ending in one of"),
        ("r", "name a picture file"),
        ("blocker/r.png", "cannot write it"),
    ],
)
def test_bad_output_is_a_one_line_error(tmp_path, capsys, output, expected):
    write_run(tmp_path / "ok", "ok", rows_count=3)
    (tmp_path / "blocker").write_text("a file where a folder would go")
    with pytest.raises(SystemExit) as exit:
        cli([str(tmp_path / "ok"), "--output", str(tmp_path / output)])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"modernbert-report: error: --output {tmp_path / output}: {expected}"), error
    assert len(error.splitlines()) == 1


def test_a_fresh_run_in_an_old_runs_folder_is_plotted_alone(tmp_path):
    folder = write_run(tmp_path / "r", "again", rows_count=6)
    old = (folder / "metrics.jsonl").read_text()
    newer = [json.dumps({"batch": step, "tokens": 10 * step, "loss/train/total": 1.0}) for step in (1, 2, 3)]
    (folder / "metrics.jsonl").write_text(old + "\n".join(newer) + "\n")
    run = read_run(str(folder))
    assert [row["tokens"] for row in run.rows] == [10, 20, 30]


def test_a_constant_share_is_drawn_from_zero(tmp_path):
    run = read_run(str(write_run(tmp_path / "r", "flat", extra={"data/mlm_probability": 0.3})))
    figure, titles = build_figure([run], smoothing=None, log_x=False)
    axes = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    assert axes["masking ratio"].get_ylim() == (0.0, 0.3 * 1.25)  # a flat line, not a zoomed-in wiggle
    assert axes["MFU"].get_ylim()[0] == 0.0  # 40% throughout: also a constant share


def test_pgf_needs_latex_so_it_is_not_offered(tmp_path, capsys):
    write_run(tmp_path / "ok", "ok", rows_count=3)
    out = tmp_path / "r.pgf"
    with pytest.raises(SystemExit) as exit:
        cli([str(tmp_path / "ok"), "--output", str(out)])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert f"--output {out}: name a picture file ending in one of" in error and len(error.splitlines()) == 1
    offered = error.partition("ending in one of ")[2].split(", ")
    assert ".pgf" not in offered and ".png" in offered and ".svg" in offered
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_a_failed_write_is_one_line_and_leaves_no_half_picture(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    write_run(tmp_path / "ok", "ok", rows_count=3)
    out = tmp_path / "r.png"
    out.write_bytes(b"the earlier picture")

    def half_then_fail(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise RuntimeError("the writer gave up\nmore detail")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(SystemExit) as exit:
        cli([str(tmp_path / "ok"), "--output", str(out)])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert (
        error
        == f"modernbert-report: error: --output {out}: cannot write a .png file here: the writer gave up"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "r.png"]
    assert out.read_bytes() == b"the earlier picture"


def stopped_by_the_guard(folder, name, last_row):
    """A run whose last row is the non-finite guard's: no tokens or samples, the non-finite loss."""
    write_run(folder, name)
    with (folder / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(last_row) + "\n")
    return folder


def test_a_row_without_a_point_does_not_decide_the_unit(tmp_path, capsys):
    guard_row = {"batch": 61, "loss/train/total": "nan", "throughput/tokens_per_sec": 9000.0,
                 "non_finite": ["loss/train/total"]}  # fmt: skip
    stopped = read_run(str(stopped_by_the_guard(tmp_path / "stopped", "stopped", guard_row)))
    assert stopped.x_key == "tokens" and len(stopped.rows) == 60
    runs = [read_run(str(write_run(tmp_path / "full", "full", tokens_per_batch=8192))), stopped]
    figure, _ = build_figure(runs, smoothing=None, log_x=False)
    for ax in (ax for ax in figure.axes if ax.get_visible()):
        assert ax.get_xlabel() == "tokens seen"
        named = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert max(named[0].get_xdata()) == 8192 * 60 and max(named[1].get_xdata()) == 4096 * 60
    cli([str(tmp_path / "full"), str(tmp_path / "stopped"), "--output", str(tmp_path / "r.png")])
    assert capsys.readouterr().err == ""


def test_runs_are_drawn_in_one_unit_or_refused(tmp_path, capsys):
    # The guard's row here carries a finite learning rate: a point, but without tokens or samples.
    guard_row = {"batch": 61, "loss/train/total": "nan", "lr-StableAdamW/group0": 1e-3,
                 "non_finite": ["loss/train/total"]}  # fmt: skip
    stopped_by_the_guard(tmp_path / "stopped", "stopped", guard_row)
    write_run(tmp_path / "full", "full", tokens_per_batch=8192)
    runs = [read_run(str(tmp_path / "full")), read_run(str(tmp_path / "stopped"))]
    assert [run.x_key for run in runs] == ["tokens", "batch"]
    figure, _ = build_figure(runs, smoothing=None, log_x=False)
    assert [run.x_key for run in runs] == ["batch", "batch"]
    lr = next(ax for ax in figure.axes if ax.get_title() == "learning rate")
    assert lr.get_xlabel() == "batches"
    named = [line for line in lr.get_lines() if not line.get_label().startswith("_")]
    assert [max(line.get_xdata()) for line in named] == [60, 61]
    cli([str(tmp_path / "full"), str(tmp_path / "stopped"), "--output", str(tmp_path / "r.png")])
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "modernbert-report: note: every run is drawn by batch, as stopped has plotted rows without tokens"
    )

    # No unit in common: refused in one line naming both runs, nothing written.
    (tmp_path / "by-tokens").mkdir()
    rows = [{"tokens": 100 * step, "loss/train/total": 3.0} for step in (1, 2)]
    (tmp_path / "by-tokens" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "by-batch").mkdir()
    rows = [{"batch": step, "loss/train/total": 3.0} for step in (1, 2)]
    (tmp_path / "by-batch" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SystemExit) as exit:
        cli([str(tmp_path / "by-tokens"), str(tmp_path / "by-batch"), "--output", str(tmp_path / "x.png")])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "the runs share no x unit" in err and len(err.splitlines()) == 1, err
    assert f"{tmp_path / 'by-tokens' / 'metrics.jsonl'} has only tokens" in err
    assert f"{tmp_path / 'by-batch' / 'metrics.jsonl'} has only batch" in err
    assert not (tmp_path / "x.png").exists()
