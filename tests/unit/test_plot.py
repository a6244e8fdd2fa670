"""``python -m hpc_dgrab.plot``: one line per run in every panel, labels from the configuration,
wall time from the records (the command line: tests/system/test_plot_cli.py)."""
from hpc_dgrab import plot
from tests.helpers import write_run


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
