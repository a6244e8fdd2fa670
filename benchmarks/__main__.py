"""``python -m benchmarks NAME ...``: dispatch to the benchmark module of that name."""
from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Dict, Optional, Sequence

import benchmarks
from hpc_dgrab.cli import UserError, run_main


def available() -> Dict[str, str]:
    """Benchmark command names mapped to their one-line descriptions."""
    found = {}
    for mod in pkgutil.iter_modules(benchmarks.__path__):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"benchmarks.{mod.name}")
        if hasattr(module, "main"):
            found[mod.name.replace("_", "-")] = (module.__doc__ or "").strip().splitlines()[0]
    return dict(sorted(found.items()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not args or args[0] in ("-h", "--help"):
        lines = ["usage: python -m benchmarks NAME [options]   (NAME --help for its options)", "",
                 "benchmarks:"] + [f"  {name:<16} {doc}" for name, doc in names.items()]
        sys.stdout.write("\n".join(lines) + "\n")
        return 0 if args else 2
    name = args[0]
    if name not in names:
        raise UserError(f"unknown benchmark {name!r}; choose from: {', '.join(names)}")
    module = importlib.import_module(f"benchmarks.{name.replace('-', '_')}")
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    run_main(main)
