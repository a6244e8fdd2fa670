"""``python -m hpc_dgrab.plot RUN.jsonl [...] -o curves.png``: training curves of one or more runs.

Six panels: train loss, validation accuracy and epoch time, each against epochs (top row) and
against wall time (bottom row); one line per run in every panel where the run has that metric.

Input: metrics files as the trainer writes them (strict JSON Lines, one object per epoch with
``epoch``, ``train_loss``, ``val_acc``, ``epoch_time_s``). Wall time is the record's ``wall_s``
(seconds since the run started, at the end of the epoch) when present, else the running sum of
``epoch_time_s``. A ``null`` value is a missing point. Each run is labelled by its configuration:
the ``config`` field (a string, or an object whose keys that differ between the runs are shown),
else the file name. A missing, empty or invalid file is one line ``error: ...`` and exit 2; the
PNG is written atomically. Needs matplotlib (``pip install 'hpc_dgrab[plot]'``); without it, one line
``error: plotting needs matplotlib: ...`` and exit 2.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from hpc_dgrab import extras, fileio
from hpc_dgrab.cli import ArgumentParser, UserError, run_main, setup_logging
from hpc_dgrab.metrics import read_jsonl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

#: (record key, panel title) of the quantities plotted, left to right
PANELS = (("train_loss", "train loss"), ("val_acc", "validation accuracy"),
          ("epoch_time_s", "epoch time (s)"))
#: record keys read as wall-clock time, in order of preference
WALL_KEYS = ("wall_s", "wall_time_s")


@dataclass
class Run:
    """One run's curves: x coordinates and the metric values (None where missing)."""

    path: str
    epochs: List[float]
    wall: List[float]
    values: Dict[str, List[Optional[float]]]
    config: Any
    label: str = ""


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def load_run(path: str) -> Run:
    """Read one metrics file into a :class:`Run`; UserError (one line) if it has no usable records."""
    records = read_jsonl(path)
    if not records:
        raise UserError(f"{path}: no epoch records (empty metrics file)")
    epochs: List[float] = []
    wall: List[float] = []
    values: Dict[str, List[Optional[float]]] = {key: [] for key, _ in PANELS}
    config, elapsed = None, 0.0
    for number, rec in enumerate(records, 1):
        epoch = _number(rec.get("epoch"))
        if epoch is None:
            raise UserError(f"{path}: record {number} has no numeric 'epoch'")
        epochs.append(epoch)
        for key in values:
            values[key].append(_number(rec.get(key)))
        elapsed += _number(rec.get("epoch_time_s")) or 0.0
        clock = next((_number(rec[k]) for k in WALL_KEYS if _number(rec.get(k)) is not None), None)
        wall.append(elapsed if clock is None else clock)
        if config is None and rec.get("config") is not None:
            config = rec["config"]
    if all(v is None for series in values.values() for v in series):
        raise UserError(f"{path}: records hold none of {', '.join(k for k, _ in PANELS)}")
    return Run(path, epochs, wall, values, config)


def label_runs(runs: Sequence[Run]) -> None:
    """Set each run's label from its configuration (the keys that differ between runs), else its
    file name; labels that would coincide get the file name added."""
    dicts = [r.config for r in runs if isinstance(r.config, dict)]
    keys = sorted({k for d in dicts for k in d})
    differ = [k for k in keys if len({repr(d.get(k)) for d in dicts}) > 1] or keys
    for r in runs:
        name = os.path.splitext(os.path.basename(r.path))[0]
        if isinstance(r.config, dict) and r.config:
            r.label = " ".join(f"{k}={r.config.get(k)}" for k in differ if k in r.config) or name
        elif isinstance(r.config, str) and r.config:
            r.label = r.config
        else:
            r.label = name
    seen: Dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({os.path.basename(r.path)})"


def build_figure(runs: Sequence[Run]) -> Figure:
    """The 2 x 3 figure (against epochs, against wall time); one line per run per panel.
    Needs matplotlib (the ``[plot]`` extra): UserError naming it otherwise."""
    figure = extras.require("matplotlib.figure", "plotting")
    ticker = extras.require("matplotlib.ticker", "plotting")
    fig = figure.Figure(figsize=(14, 7.5), layout="constrained")
    axes = fig.subplots(2, len(PANELS), squeeze=False)
    for col, (key, title) in enumerate(PANELS):
        for row, (xname, against, xlabel) in enumerate((("epochs", "epoch", "epoch"),
                                                        ("wall", "wall time", "wall time (s)"))):
            ax = axes[row][col]
            for run in runs:
                points = [(x, y) for x, y in zip(getattr(run, xname), run.values[key]) if y is not None]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o", markersize=3, label=run.label)
            ax.set_title(f"{title} vs {against}")
            ax.set_xlabel(xlabel)
            if xname == "epochs":
                ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if key == "train_loss" and all(y > 0 for run in runs for y in run.values[key] if y is not None):
                ax.set_yscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:  # the first panel may lack a metric that others have
        for ax in axes.flat:
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                break
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3) or 1, fontsize="small")
    return fig


def plot_runs(paths: Sequence[str], out: str) -> Figure:
    """Read the metrics files, draw the figure and write it to ``out`` (atomically)."""
    problem = fileio.output_problem(out, "--out")   # before reading and drawing anything
    if problem:
        raise UserError(problem)
    runs = [load_run(p) for p in paths]
    label_runs(runs)
    fig = build_figure(runs)
    try:
        fileio.save_figure(fig, out, dpi=120)
    except OSError as exc:
        raise UserError(f"{out}: cannot write the figure: {exc.strerror or exc}") from None
    except ValueError as exc:  # an unknown image format
        raise UserError(f"{out}: {exc}") from None
    log.info("wrote %s (%d run(s))", out, len(runs))
    return fig


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m hpc_dgrab.plot",
                       description="Plot train loss, validation accuracy and epoch time of training runs "
                                   "against epochs and wall time, one line per run.")
    p.add_argument("runs", nargs="+", metavar="RUN.jsonl",
                   help="metrics files written by the trainer (--metrics)")
    p.add_argument("-o", "--out", default="curves.png", help="output image (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug, rank=0)
    plot_runs(args.runs, args.out)
    return 0


def cli() -> None:
    """Console-script entry point: :func:`main` under the one-line error contract."""
    run_main(main)


if __name__ == "__main__":
    cli()
