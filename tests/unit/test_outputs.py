"""fileio.output_problem: an output path that cannot be written is one line naming the option and
the path; a writable one passes and leaves nothing behind."""
import os

from hpc_dgrab.fileio import output_problem
from hpc_dgrab.metrics import MetricsError, MetricsLog


def test_writable_paths_pass_and_leave_nothing(tmp_path):
    assert output_problem(str(tmp_path / "new" / "m.jsonl"), "--metrics") is None
    assert output_problem(str(tmp_path / "ckpt"), "--checkpoint-dir", directory=True) is None
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "new"] and os.listdir(tmp_path / "new") == []


def test_a_file_in_the_way_is_one_line(tmp_path):
    blocker = tmp_path / "plain"
    blocker.write_text("x")
    problem = output_problem(str(blocker / "m.jsonl"), "--metrics")
    assert problem is not None and problem.startswith(f"--metrics {blocker}/m.jsonl: cannot write in ")
    problem = output_problem(str(blocker), "--data-cache", directory=True)
    assert problem is not None and problem.startswith(f"--data-cache {blocker}: cannot write")


def test_a_directory_given_for_a_file(tmp_path):
    assert output_problem(str(tmp_path), "--out") == f"--out {tmp_path}: is a directory, not a file"


def test_metrics_write_failure_is_a_metrics_error_naming_the_file(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(str(path))
    log.append({"epoch": 1})
    os.unlink(path)
    os.mkdir(path)   # the next atomic rename fails, as on a full or vanished disk
    try:
        log.append({"epoch": 2})
    except MetricsError as exc:
        assert str(exc).startswith(f"{path}: cannot write: ")
    else:
        raise AssertionError("no error")
