"""Benchmarks and paper reproductions: ``python -m benchmarks NAME [options] --out DIR``, run from the
checkout (this package is not installed with ``hpc_dgrab``; it measures what users run: the public
API ``hpc_dgrab.*`` and the trainer ``python -m hpc_dgrab.train``).

Each benchmark is one module here named after the command (``regtopk-linreg`` ->
``regtopk_linreg.py``) with a ``main(argv) -> int`` and a one-line module docstring that the
listing shows. Every benchmark writes ``DIR/NAME.json`` (and a PNG where a curve says more) and
reports speed as a ratio against a baseline measured in the same run. Helpers without a ``main``:
``checkout`` (where the checkout is, launching its commands), ``virtual`` (virtual workers).
"""
