"""``python -m hpc_dgrab.plot``: one-line errors for bad input, and the PNG written."""
import os

import pytest

from tests.helpers import assert_one_line_error, run_cmd, write_run


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
