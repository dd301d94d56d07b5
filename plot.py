"""Learning curves of one or more runs, overlaid, from their log.jsonl, drawn into a PNG.

    python plot.py runs/train_rnn-20261121-101500 runs/train_rmc-20261121-113000 -o ppl.png
    python plot.py runs/copy-dnc runs/copy-sam --metric bit_errors loss -o copy.png
    python plot.py runs/main-* --x epoch --metric ppl

Works on language-model runs (train_rnn.py, train_rmc.py, main.py, finetune.py: train, valid and
test perplexity or loss) and task runs (train_nth_farthest.py, copy_task.py, adding_task.py,
argmax_task.py: training loss and every test metric, such as bit errors or accuracy, and the
sequence tasks' generalisation curve against sequence length). One panel per metric; in each,
one colour per run (the legend names the run folder) and one line style per split: training
solid, validation dashed, test dotted with markers, the final test a star. Needs only matplotlib
(the Agg canvas, so no display is needed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from errors import UserInputError

X_AXES = ("step", "epoch", "time")
X_LABELS = {"step": "training step (batch / iteration)", "epoch": "epoch", "time": "wall-clock time (min)"}
# Fields of a test / valid event that are not metrics.
NOT_METRICS = {"event", "time", "step", "epoch", "lr", "seconds", "epoch_seconds", "asgd", "max_length", "length"}
# Each split's line style: (linestyle, marker, line width, opacity).
STYLES = {"train": ("-", "", 1.0, 0.55), "valid": ("--", "o", 1.6, 1.0), "test": (":", "s", 1.6, 1.0),
          "final test": ("", "*", 0.0, 1.0)}
LOG_SCALE_METRICS = {"ppl"}
LABELS = {"ppl": "perplexity"}


def label(metric: str) -> str:
    return LABELS.get(metric, metric.replace("_", " "))


@dataclass
class Series:
    """One line: a run's values of a metric in one split."""

    split: str  # train, valid, test, final test
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)


@dataclass
class RunLog:
    """A run folder's log: its events, and whether it is a language-model run."""

    path: Path
    events: list[dict]
    language_model: bool

    @property
    def name(self) -> str:
        return self.path.name


def read_run(path: str | Path) -> RunLog:
    """The events of a run folder (or of a log.jsonl given directly).

    Raises:
        UserInputError: the folder has no log.jsonl, or the log is not JSON lines.
    """
    path = Path(path)
    log_path = path if path.name == "log.jsonl" else path / "log.jsonl"
    folder = log_path.parent
    if not log_path.is_file():
        what = "does not exist" if not path.exists() else "is not a run folder (it has no log.jsonl)"
        raise UserInputError(f"{path} {what}; give the run folder a training script printed "
                             f"('run folder runs/...')")
    text = log_path.read_text()
    if not text.endswith("\n"):  # a running run may be writing its last line: leave that line out
        text = text[:text.rfind("\n") + 1]
    events = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserInputError(f"{log_path} line {number} is not JSON; is it a run's log.jsonl?") from None
    language_model = any(event.get("event") == "valid" or "ppl" in event for event in events)
    return RunLog(folder, events, language_model)


def epoch_positions(run: RunLog) -> dict[int, float]:
    """Step -> fractional epoch of a language-model run, from the steps at which its epochs ended.

    A step in epoch e (counted from 1) lies at e - 1 + (its share of that epoch's steps); an epoch
    not finished yet is taken to be as long as the one before (the first: as long as it has run).
    """
    ends = {0: 0}  # epoch -> the step at its end
    last_step: dict[int, int] = {}  # epoch -> its last logged step
    for event in run.events:
        if event.get("event") == "valid" and event.get("epoch") is not None:
            ends[event["epoch"]] = event["step"]
        if event.get("epoch") is not None and event.get("step") is not None:
            last_step[event["epoch"]] = max(last_step.get(event["epoch"], 0), event["step"])
    positions = {}
    for event in run.events:
        step, epoch = event.get("step"), event.get("epoch")
        if step is None or step in positions and event.get("event") != "valid":
            continue
        if epoch is None:  # the final test: after the last epoch that ended
            positions[step] = float(max(ends))
        elif event.get("event") == "valid":
            positions[step] = float(epoch)
        else:
            start = ends.get(epoch - 1, 0)
            if epoch in ends:
                length = ends[epoch] - start
            elif epoch - 1 in ends and epoch - 2 in ends:
                length = ends[epoch - 1] - ends[epoch - 2]
            else:
                length = last_step[epoch] - start
            positions[step] = epoch - 1 + (step - start) / max(length, 1)
    return positions


def x_value(run: RunLog, event: dict, x_axis: str, start_time: float, epochs: dict[int, float]) -> float | None:
    if x_axis == "time":
        return (event["time"] - start_time) / 60 if "time" in event else None
    step = event.get("step")
    if step is None:
        return None
    return epochs.get(step) if x_axis == "epoch" else float(step)


def as_number(value) -> float:
    """A logged value as a float; None (a non-finite value in the log) becomes NaN, breaking the line."""
    return math.nan if value is None else float(value)


def series(run: RunLog, metric: str, x_axis: str) -> list[Series]:
    """The lines of `metric` in `run`: train, valid, test and final test, whichever the log has.

    Language-model runs: train and valid events carry `loss` and `ppl`; the end's test event
    `test_loss`, `test_ppl` (drawn as one "final test" point). Task runs: train events carry
    `loss`; test events `loss` and every metric of the task; a sequence task's final event the
    metrics after the last iteration.
    """
    if x_axis == "epoch" and not run.language_model:
        raise UserInputError(f"--x epoch needs language-model runs; {run.path} is a task run, which counts "
                             f"iterations (use --x step or --x time)")
    start_time = min((event["time"] for event in run.events if "time" in event), default=0.0)
    epochs = epoch_positions(run) if x_axis == "epoch" else {}
    lines: dict[str, Series] = {}
    for event in run.events:
        kind = event.get("event")
        if kind in ("train", "valid") or (kind == "test" and not run.language_model):
            key, split = metric, kind
        elif kind == "test" and run.language_model:
            key, split = f"test_{metric}", "final test"
        elif kind == "final":
            key, split = metric, "final test"
        else:
            continue
        if key not in event:
            continue
        x = x_value(run, event, x_axis, start_time, epochs)
        if x is None:
            continue
        line = lines.setdefault(split, Series(split))
        line.x.append(x)
        line.y.append(as_number(event[key]))
    return [lines[split] for split in STYLES if split in lines]


def generalisation(run: RunLog, metric: str) -> Series | None:
    """A sequence task's generalisation curve: `metric` against sequence length (the last measurement)."""
    points: dict[int, float] = {}
    for event in run.events:
        if event.get("event") == "generalisation" and metric in event:
            points[event["length"]] = as_number(event[metric])
    if not points:
        return None
    lengths = sorted(points)
    return Series("generalisation", [float(length) for length in lengths], [points[length] for length in lengths])


def available_metrics(runs: list[RunLog]) -> list[str]:
    """Every metric some run logged, in first-seen order (language models: ppl, loss)."""
    seen: dict[str, None] = {}
    for run in runs:
        if run.language_model:
            seen.update({"ppl": None, "loss": None})
            continue
        for event in run.events:
            if event.get("event") in ("train", "test", "final", "generalisation"):
                seen.update({key: None for key, value in event.items()
                             if key not in NOT_METRICS and isinstance(value, (int, float, type(None)))
                             and key != "ms_per_step"})
    return list(seen)


def default_metrics(runs: list[RunLog]) -> list[str]:
    """Perplexity for language-model runs; for task runs loss and every test metric."""
    metrics = available_metrics(runs)
    return ["ppl"] if all(run.language_model for run in runs) else metrics


def unique_names(runs: list[RunLog]) -> list[str]:
    """The run folders' names, or their paths where two runs share a folder name."""
    names = [run.name for run in runs]
    return [str(run.path) if names.count(run.name) > 1 else run.name for run in runs]


def build_figure(runs: list[RunLog], metrics: list[str], x_axis: str = "step", log_y: bool | None = None,
                 title: str = ""):
    """A matplotlib Figure (Agg canvas) with a panel per metric, plus a generalisation panel per metric
    that some sequence-task run measured against length.

    Raises:
        UserInputError: a metric no run logged, or --x epoch with a task run.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    known = available_metrics(runs)
    for metric in metrics:
        if metric not in known:
            raise UserInputError(f"--metric {metric}: no run logged it; these runs have: {', '.join(known)}")
    panels: list[tuple[str, str, list[tuple[int, Series]]]] = []  # (metric, x label, [(run index, series)])
    for metric in metrics:
        lines = [(index, line) for index, run in enumerate(runs) for line in series(run, metric, x_axis)]
        if lines:
            panels.append((metric, X_LABELS[x_axis], lines))
    for metric in metrics:
        curves = [(index, curve) for index, run in enumerate(runs) if (curve := generalisation(run, metric))]
        if curves:
            panels.append((f"{metric}, generalisation", "sequence length", curves))
    if not panels:
        raise UserInputError(f"nothing to draw: the runs logged no points of {', '.join(metrics)} yet")

    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6.4 * columns, 4.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    names = unique_names(runs)
    colours = [f"C{index % 10}" for index in range(len(runs))]
    for number, (metric, x_label, lines) in enumerate(panels):
        axis = figure.add_subplot(rows, columns, number + 1)
        for index, line in lines:
            style, marker, width, alpha = STYLES.get(line.split, ("-", "o", 1.6, 1.0))
            legend = names[index] if line.split == "generalisation" else f"{names[index]} {line.split}"
            axis.plot(line.x, line.y, linestyle=style or "none", marker=marker or None, linewidth=width,
                      alpha=alpha, color=colours[index], label=legend, markersize=9 if marker == "*" else 4)
        name, _, what = metric.partition(", ")
        if log_y or (log_y is None and name in LOG_SCALE_METRICS):
            axis.set_yscale("log")
        axis.set_xlabel(x_label)
        axis.set_ylabel(label(name))
        axis.set_title(label(name) + (f", {what}" if what else ""))
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return figure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their log.jsonl files)")
    parser.add_argument("-o", "--output", default="curves.png", help="the PNG to write (default: %(default)s)")
    parser.add_argument("--x", choices=X_AXES, default="step",
                        help="x axis: training step, epoch (language models) or wall-clock minutes since the "
                             "run's first log line (default: %(default)s)")
    parser.add_argument("--metric", nargs="+", default=None,
                        help="metrics to draw, one panel each, e.g. ppl loss (language models), loss bit_errors "
                             "accuracy (tasks) (default: ppl for language-model runs, every metric for tasks)")
    parser.add_argument("--log-y", "--log_y", dest="log_y", action=argparse.BooleanOptionalAction, default=None,
                        help="logarithmic y axis (default: for perplexity only)")
    parser.add_argument("--title", default="", help="a title above the panels (default: none)")
    parser.add_argument("--dpi", type=int, default=90, help="resolution of the PNG (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    runs = [read_run(path) for path in args.runs]
    metrics = args.metric or default_metrics(runs)
    figure = build_figure(runs, metrics, args.x, args.log_y, args.title)
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise UserInputError(f"-o {output}: plot.py writes PNG files; name it *.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=args.dpi)
    print(f"wrote {output}: {', '.join(metrics)} of {len(runs)} run{'s' if len(runs) > 1 else ''}")
    return output


if __name__ == "__main__":
    try:
        main()
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
