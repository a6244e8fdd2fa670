"""Benchmarks and paper reproductions: ``python -m benchmarks NAME [options] --out DIR``.

Each benchmark is one module here named after the command (``regtopk-linreg`` ->
``regtopk_linreg.py``) with a ``main(argv) -> int`` and a one-line module docstring that the
listing shows. Every benchmark writes ``DIR/NAME.json`` (and a PNG where a curve says more) and
reports speed as a ratio against a baseline measured in the same run.
"""
