"""``benchmarks/`` stays out of the installed package: the listing, every --help, and no import of it
(or of the checkout) from ``hpc_dgrab``."""
import ast
import importlib
import os

import pytest

from benchmarks.__main__ import available
from benchmarks.__main__ import main as bench_main
from benchmarks.checkout import ROOT

NAMES = ["comm", "compress", "data", "ddp-order", "gradalign", "herding", "horovod-synthetic", "memory", "ops-latency",
         "order", "peers",
         "regtopk-linreg", "scaling", "simulate", "straggler", "time-to-accuracy"]


def test_listing_names_every_benchmark(capsys):
    assert list(available()) == NAMES
    assert bench_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m benchmarks NAME")
    assert all(f"  {name} " in out for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_benchmark_has_help(name, capsys):
    module = importlib.import_module(f"benchmarks.{name.replace('-', '_')}")
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    assert f"python -m benchmarks {name}" in capsys.readouterr().out


def test_the_package_does_not_import_benchmarks():
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "hpc_dgrab")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            with open(path) as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path}: {n}" for n in names if n.split(".")[0] == "benchmarks"]
    assert not offenders
