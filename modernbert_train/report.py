"""`modernbert-report RUN_DIR [RUN_DIR ...] --output report.png`: a run's metrics.jsonl as one picture.

Panels share one x axis, tokens seen, so runs with other batch sizes line up: train loss, eval loss and
accuracy, learning rate, masking ratio, tokens/s, MFU and data-wait time, each drawn only when some run
logged it. Every run is drawn in one unit: tokens where each plotted row of every run has them, else samples,
else batches. Several runs are overlaid in one colour each, named by their config.yaml's run_name. Noisy
series (train loss, throughput) are drawn faint as logged with an exponential moving average on top. Run
folders may be local or in a bucket (s3://...).
"""

import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from modernbert_train import storage
from modernbert_train.cli_parser import OneLineErrorParser

METRICS_FILE = "metrics.jsonl"
X_KEYS = ("tokens", "samples", "batch")  # the x units, preferred first
# Formats that need no program outside Python (pgf needs a LaTeX installation).
NEEDS_A_PROGRAM = {"pgf"}


class ReportError(ValueError):
    """Unreadable run: the message names the file, line or key."""


@dataclass
class Panel:
    """One plot: the series whose key matches `pattern` (a regex; its group 1, when there is one, tells
    several series of one run apart), how to draw them."""

    title: str
    pattern: str
    log_y: bool = False
    smooth: bool = False
    percent: bool = False


PANELS = (
    Panel("train loss", r"loss/train/total$", log_y=True, smooth=True),
    Panel("eval loss", r"metrics/(.+)/MLMLoss$", log_y=True),
    Panel("eval accuracy (masked tokens)", r"metrics/(.+)/MLMAccuracy$", percent=True),
    Panel("learning rate", r"lr-[^/]+/(group0)$"),
    Panel("masking ratio", r"data/mlm_probability$", percent=True),
    Panel("tokens/s per device", r"throughput/device/tokens_per_sec$", smooth=True),
    Panel("MFU", r"throughput/device/mfu$", smooth=True, percent=True),
    Panel("data wait (s per batch)", r"time/data_wait$", smooth=True),
)


@dataclass
class Run:
    """A run's plotted rows: those with a finite value of some panel's metric (a row that only says a run
    stopped adds no point, so it does not decide the x unit)."""

    name: str
    source: str
    units: tuple[str, ...]  # the X_KEYS every plotted row has, preferred first
    rows: list[dict] = field(default_factory=list)
    x_key: str = ""  # the unit drawn: units[0] until `common_unit` picks one for all the runs in a picture

    def __post_init__(self):
        self.x_key = self.x_key or self.units[0]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(x, y) of the rows that logged `key` with a finite value."""
        points = [(row[self.x_key], row[key]) for row in self.rows if _finite(row.get(key))]
        return [p[0] for p in points], [p[1] for p in points]


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def plotted(row: dict) -> bool:
    """Whether a row adds a point to some panel."""
    return any(_finite(value) and _drawn_key(key) for key, value in row.items())


@cache
def _drawn_key(key: str) -> bool:
    return any(re.fullmatch(panel.pattern, key) for panel in PANELS)


def metrics_path(run: str) -> str:
    """A run folder (its metrics.jsonl) or a metrics.jsonl file itself, local or a URI (s3://...)."""
    if storage.is_uri(run):
        path = run if run.rstrip("/").endswith(METRICS_FILE) else storage.join(run, METRICS_FILE)
        if not storage.exists(path):
            raise ReportError(f"{path}: no such file (expected a run folder holding {METRICS_FILE})")
        return path
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"{path}: no such file (expected a run folder holding {METRICS_FILE})")
    return str(path)


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if storage.is_uri(path) else str(Path(path).parent)


def run_name(path: str) -> str:
    """config.yaml's run_name next to the metrics file, else the folder's name."""
    config = storage.join(_parent(path), "config.yaml")
    if storage.exists(config):
        text = storage.read_text(config)
        match = re.search(r"^run_name:\s*['\"]?([^'\"\n#]+?)['\"]?\s*(?:#.*)?$", text, re.M)
        if match:
            return match.group(1)
    if storage.is_uri(path):
        return _parent(path).rsplit("/", 1)[-1]
    return Path(path).parent.resolve().name


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows of the newest run in the file. A resumed run first drops the rows past its checkpoint, so
    `batch` only falls where a fresh run was started in a folder that held an older run's metrics."""
    batches = [row.get("batch") if _finite(row.get("batch")) else None for row in rows]
    starts = [
        i for i in range(1, len(rows)) if None not in batches[i - 1 : i + 1] and batches[i] <= batches[i - 1]
    ]
    return rows[starts[-1] :] if starts else rows


def read_run(run: str) -> Run:
    path = metrics_path(run)
    text = storage.decode_text(storage.read_bytes(path), path)
    rows = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                continue  # a row cut short by a kill mid-write: the run's next start drops it too
            raise ReportError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ReportError(f"{path}: no metrics logged yet")
    rows = [row for row in latest_run(rows) if plotted(row)]
    units = tuple(key for key in X_KEYS if all(_finite(row.get(key)) for row in rows))
    if not units:
        raise ReportError(f"{path}: rows lack a numeric 'tokens', 'samples' or 'batch' to plot against")
    rows.sort(key=lambda row: row[units[0]])
    return Run(run_name(path), path, units, rows)


def common_unit(runs: list[Run]) -> str:
    """The preferred x unit every run has, set as each run's `x_key`: one axis never mixes units."""
    unit = next((key for key in X_KEYS if all(key in run.units for run in runs)), None)
    if unit is None:
        has = "; ".join(f"{run.source} has only {'/'.join(run.units)}" for run in runs)
        raise ReportError(f"the runs share no x unit ('tokens', 'samples' or 'batch') to draw them on: {has}")
    for run in runs:
        run.x_key = unit
        run.rows.sort(key=lambda row: row[unit])
    return unit


def unique_names(runs: list[Run]) -> None:
    """Runs that share a name (two folders of one recipe) are told apart by their folder."""
    for run in runs:
        if sum(other.name == run.name for other in runs) > 1:
            run.name = f"{run.name} ({_parent(run.source)})"


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, bias-corrected so the start is not pulled toward zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def auto_smoothing(points: int) -> float:
    """An EMA spanning about 1/30 of the run: long runs stay readable, short ones are barely touched."""
    span = max(1.0, points / 30)
    return 1 - 2 / (span + 1)


def panel_series(panel: Panel, run: Run) -> dict[str, tuple[list[float], list[float]]]:
    """The panel's series for one run, by label (empty for one unnamed series)."""
    keys = sorted({key for row in run.rows for key in row if re.fullmatch(panel.pattern, key)})
    out = {}
    for key in keys:
        match = re.fullmatch(panel.pattern, key)
        label = match.group(1) if match.groups() and match.group(1) not in ("eval", "group0") else ""
        x, y = run.series(key)
        if x:
            out[label] = (x, y)
    return out


def picture_format(output: str) -> str:
    """The file format `output`'s suffix names, when matplotlib can write it by itself."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = output.rstrip("/").rpartition("/")[2].rpartition(".")[2].lower() if "." in output else ""
    formats = set(FigureCanvasBase.get_supported_filetypes()) - NEEDS_A_PROGRAM
    if suffix not in formats:
        raise ReportError(
            f"--output {output}: name a picture file ending in one of .{', .'.join(sorted(formats))}"
        )
    return suffix


def draw(runs: list[Run], output: str, smoothing: float | None, log_x: bool) -> list[str]:
    """Write the picture (a local path or a URI); returns the titles of the panels drawn."""
    import matplotlib.pyplot as plt

    suffix = picture_format(output)
    figure, titles = build_figure(runs, smoothing, log_x)
    staged = None
    try:
        if storage.is_uri(output):
            with tempfile.TemporaryDirectory(prefix="modernbert-report-") as staging:
                local = Path(staging, f"report.{suffix}")
                figure.savefig(local, dpi=110, format=suffix)
                storage.upload_file(local, output)
        else:
            # Written beside the picture, then renamed over it: a failed write leaves no half a picture.
            path = Path(output)
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_name(f".{path.name}.partial-{os.getpid()}")
            figure.savefig(staged, dpi=110, format=suffix)
            os.replace(staged, path)
            staged = None
    except OSError as error:
        raise ReportError(f"--output {output}: cannot write it: {error.strerror or error}") from None
    except (RuntimeError, ValueError) as error:  # a format whose writer is missing here (Pillow's, say)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ReportError(f"--output {output}: cannot write a .{suffix} file here: {reason}") from None
    finally:
        plt.close(figure)
        if staged is not None:
            staged.unlink(missing_ok=True)
    return titles


def build_figure(runs: list[Run], smoothing: float | None, log_x: bool):
    """The figure (one panel per metric some run logged) and the titles of its panels."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, FuncFormatter, PercentFormatter, ScalarFormatter

    unit = common_unit(runs)
    drawn = [(panel, [panel_series(panel, run) for run in runs]) for panel in PANELS]
    drawn = [(panel, per_run) for panel, per_run in drawn if any(per_run)]
    if not drawn:
        sources = ", ".join(run.source for run in runs)
        raise ReportError(f"{sources}: no finite value of any plotted metric to draw")
    columns = 2
    rows = math.ceil(len(drawn) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x_label = f"{unit} seen" if unit != "batch" else "batches"
    for ax, (panel, per_run) in zip(axes.flat, drawn):
        for i, (run, series) in enumerate(zip(runs, per_run)):
            colour = colours[i % len(colours)]
            for j, (label, (x, y)) in enumerate(series.items()):
                name = f"{run.name} {label}".strip()
                style = ("-", "--", ":", "-.")[j % 4]
                if panel.smooth and len(y) > 2:
                    weight = auto_smoothing(len(y)) if smoothing is None else smoothing
                    ax.plot(x, y, style, color=colour, alpha=0.25, linewidth=0.8)
                    ax.plot(x, ema(y, weight), style, color=colour, label=name, linewidth=1.5)
                else:
                    marker = "o" if len(y) < 30 else None
                    ax.plot(x, y, style, color=colour, label=name, marker=marker, markersize=3)
        ax.set_title(panel.title)
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
        if log_x:
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter())  # after the scale: setting one resets the formatter
        values = [v for series in per_run for _, y in series.values() for v in y]
        # A log axis only helps a loss that falls by a large factor; over a narrow range it hides labels.
        if panel.log_y and min(values) > 0 and max(values) / min(values) > 4:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            # Under a decade matplotlib labels the minor ticks too, as 6x10^0: plain numbers instead.
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        if panel.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            if max(values) - min(values) < 0.01 * max(abs(v) for v in values) + 1e-12:
                # A constant share (a fixed masking ratio) on a zoomed axis looks like a change: from 0.
                ax.set_ylim(0, max(values) * 1.25 or 1)
        ax.legend(fontsize=8)
    # One tokens-seen range for every panel, so a point sits at the same place in each.
    xs = [row[run.x_key] for run in runs for row in run.rows]
    for ax in list(axes.flat)[: len(drawn)]:
        ax.set_xlim(min(xs), max(xs))
    for ax in list(axes.flat)[len(drawn) :]:
        ax.set_visible(False)
    figure.tight_layout()
    return figure, [panel.title for panel, _ in drawn]


def cli(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="modernbert-report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders (or their metrics.jsonl), local or URIs (s3://bucket/run)",
    )
    parser.add_argument(
        "--output", "-o", required=True, help="the picture to write (.png, .pdf, .svg), local or a URI"
    )
    parser.add_argument(
        "--smoothing",
        type=float,
        help="EMA weight in [0, 1) for noisy series (0: none); default: spans about 1/30 of each run",
    )
    parser.add_argument("--log-x", action="store_true", help="tokens seen on a log axis")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoothing is not None and not 0 <= args.smoothing < 1:
        parser.error(f"--smoothing must be in [0, 1), got {args.smoothing}")
    try:
        runs = [read_run(run) for run in args.runs]
        unique_names(runs)
        panels = draw(runs, args.output, args.smoothing, args.log_x)
    except (ReportError, storage.StorageError) as error:
        print(f"modernbert-report: error: {error}", file=sys.stderr)
        sys.exit(2)
    unit = runs[0].x_key
    if preferred := [run.units[0] for run in runs if run.units[0] != unit]:
        best = min(preferred, key=X_KEYS.index)
        forcing = ", ".join(run.name for run in runs if best not in run.units)
        print(f"modernbert-report: note: every run is drawn by {unit}, as {forcing} has plotted rows without "
              f"{best}", file=sys.stderr)  # fmt: skip
    print(f"wrote {args.output} ({len(runs)} run(s): {', '.join(panels)})")


if __name__ == "__main__":
    cli()
