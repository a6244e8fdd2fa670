"""The optional dependencies (extras): with matplotlib or scikit-learn unimportable, the package still
imports and the feature that needs one fails with one line naming the extra, exit 2.

A directory first on PYTHONPATH holds ``matplotlib/`` and ``sklearn/`` packages whose import raises
ImportError, as an environment without the ``[plot]`` / ``[datasets]`` extras behaves.
"""
import os

import pytest

from tests.helpers import ROOT, assert_one_line_error, child_env, run_cmd, write_run

PLOT_LINE = "error: plotting needs matplotlib: pip install 'hpc_dgrab[plot]'"
DIGITS_LINE = "the digits data set needs scikit-learn: pip install 'hpc_dgrab[datasets]'"


@pytest.fixture
def without_extras(tmp_path):
    """The environment of a child process in which ``import matplotlib`` and ``import sklearn`` fail."""
    blocked = tmp_path / "blocked"
    for name in ("matplotlib", "sklearn"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} blocked by the test')\n")
    return child_env(PYTHONPATH=os.pathsep.join([str(blocked), ROOT, os.environ.get("PYTHONPATH", "")]))


def test_every_module_imports_without_the_extras(without_extras):
    code = ("import importlib, pkgutil, sys, hpc_dgrab\n"
            "for m in pkgutil.walk_packages(hpc_dgrab.__path__, 'hpc_dgrab.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "assert 'matplotlib' not in sys.modules and 'sklearn' not in sys.modules\n"
            "print('ok')\n")
    proc = run_cmd(["-c", code], env=without_extras, timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr


def test_plot_without_matplotlib_is_one_line(tmp_path, without_extras):
    run = write_run(tmp_path / "a.jsonl")
    out = tmp_path / "curves.png"
    proc = run_cmd(["-m", "hpc_dgrab.plot", run, "-o", str(out)], env=without_extras, timeout=120)
    assert assert_one_line_error(proc) == PLOT_LINE
    assert proc.returncode == 2 and not out.exists()


def test_shard_digits_without_scikit_learn_is_one_line(tmp_path, without_extras):
    out = tmp_path / "digits-2"
    proc = run_cmd(["-m", "hpc_dgrab.data", "shard", "digits", "--out", str(out), "--shards", "2"],
                   env=without_extras, timeout=120)
    assert assert_one_line_error(proc) == "error: " + DIGITS_LINE
    assert proc.returncode == 2 and not out.exists()


def test_train_on_digits_without_scikit_learn_is_one_line_on_two_ranks(tmp_path, without_extras):
    proc = run_cmd(["-m", "hpc_dgrab.train", "--data", "digits", "--epochs", "1", "--progress", "off"],
                   ranks=2, cwd=str(tmp_path), env=without_extras, timeout=180)
    assert_one_line_error(proc, DIGITS_LINE)
    assert proc.returncode == 2
