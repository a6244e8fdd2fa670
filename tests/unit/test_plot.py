"""``python -m hpc_dgrab.plot``: one line per run in every panel, labels from the configuration,
wall time from the records, and one-line errors for bad input."""
import os

import pytest

from conftest import assert_one_line_error, run_cmd
from hpc_dgrab import plot
from hpc_dgrab.metrics import MetricsLog


def write_run(path, config=None, epochs=3, wall=False, missing_acc=False):
    log = MetricsLog(str(path))
    for e in range(1, epochs + 1):
        rec = {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.0, "val_acc": None if missing_acc else 0.1 * e,
               "epoch_time_s": 2.0, "comm_bytes": 0}
        if wall:
            rec["wall_s"] = 10.0 * e
        if config is not None:
            rec["config"] = config
        log.append(rec)
    return str(path)


def test_figure_has_one_line_per_run_and_config_labels(tmp_path):
    a = write_run(tmp_path / "a.jsonl", {"sync": "allreduce", "order": "rr", "epochs": 3})
    b = write_run(tmp_path / "b.jsonl", {"sync": "allreduce", "order": "dgrab", "epochs": 3}, wall=True)
    c = write_run(tmp_path / "c.jsonl", epochs=2)
    out = str(tmp_path / "curves.png")
    fig = plot.plot_runs([a, b, c], out)
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    axes = fig.axes
    assert len(axes) == 6
    for ax in axes:
        assert [line.get_label() for line in ax.get_lines()] == ["order=rr", "order=dgrab", "c"]
    wall_loss = axes[3].get_lines()  # bottom row, first column: train loss against wall time
    assert list(wall_loss[0].get_xdata()) == [2.0, 4.0, 6.0]     # cumulative epoch_time_s
    assert list(wall_loss[1].get_xdata()) == [10.0, 20.0, 30.0]  # the run's own wall clock
    assert list(axes[0].get_lines()[2].get_ydata()) == [1.0, 0.5]


def test_missing_values_leave_out_the_line(tmp_path):
    a = write_run(tmp_path / "a.jsonl")
    b = write_run(tmp_path / "b.jsonl", missing_acc=True)
    fig = plot.plot_runs([a, b], str(tmp_path / "x.png"))
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 1, 2, 2, 1, 2]


@pytest.mark.parametrize("content,fragment", [
    (None, "absent.jsonl: no such file"),
    ("", "no epoch records"),
    ('{"epoch": 1, "train_loss": NaN}\n', "bad.jsonl:1: not a JSON object line"),
    ("not json\n", "bad.jsonl:1: not a JSON object line"),
    ('{"train_loss": 1.0}\n', "record 1 has no numeric 'epoch'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, content, fragment):
    path = tmp_path / ("absent.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content)
    out = tmp_path / "curves.png"
    proc = run_cmd(["-m", "hpc_dgrab.plot", str(path), "-o", str(out)], timeout=120)
    assert_one_line_error(proc, fragment)
    assert proc.returncode == 2 and not out.exists()
    assert sorted(os.listdir(tmp_path)) == ([] if content is None else ["bad.jsonl"])


def test_command_line_writes_the_png(tmp_path):
    a = write_run(tmp_path / "a.jsonl")
    out = tmp_path / "sub" / "curves.png"
    proc = run_cmd(["-m", "hpc_dgrab.plot", a, "-o", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
