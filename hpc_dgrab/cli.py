"""Shared command-line plumbing: one-line errors, exit codes, logging, agreement across ranks.

Contract: a user's mistake ends with one line ``error: ...`` on stderr and a non-zero
exit on every rank, without a traceback unless ``--debug`` is given, and never with a hang.

* Errors every rank detects alike (argument parsing, a missing directory) simply raise
  :class:`UserError` on every rank; rank 0 prints the line and all exit with code 2.
* Errors only some ranks see (one rank's shard is truncated) go through
  :func:`hpc_dgrab.errors.agree`: every rank
  contributes its own message (or None) to one allgather and all raise the first one together.
* Anything else that escapes on a multi-rank job calls ``MPI_Abort`` so no rank is left waiting
  in a collective.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

from hpc_dgrab import runtime
from hpc_dgrab.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, UserError

log = logging.getLogger(__name__)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line error format."""

    def error(self, message: str) -> NoReturn:  # noqa: D102 - argparse API
        raise UserError(f"{self.prog}: {message}")


def _number(cast: Callable[[str], Any], ok: Callable[[Any], bool], want: str) -> Callable[[str], Any]:
    """An argparse type: ``cast(text)`` that must satisfy ``ok``; errors say it wanted ``want``."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    parse.__name__ = want
    return parse


#: argparse types for counts, rates and non-negative knobs.
positive_int = _number(int, lambda v: v > 0, "an integer > 0")
positive_float = _number(float, lambda v: 0 < v < math.inf, "a finite number > 0")
nonneg_float = _number(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")


def setup_logging(debug: bool = False, rank: Optional[int] = None) -> None:
    """Log to stderr as ``[rank R] LEVEL message``; INFO by default, DEBUG with ``--debug``."""
    if rank is None:
        rank = runtime.launcher_rank()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("hpc_dgrab")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def _say(line: str) -> None:
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]],
             argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run a command's ``main(argv)`` with the project's error contract, then exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = main(args)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        parallel = runtime.mpi_initialized() and runtime.world().size > 1
        if not parallel or not exc.collective:
            if runtime.launcher_rank() == 0 or parallel:  # before MPI: every rank sees the same error
                _say(f"error: {exc}")
            if parallel:
                _abort_if_parallel(EXIT_USAGE)
        elif runtime.world().rank == 0:
            _say(f"error: {exc}")
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        _say("error: interrupted")
        _abort_if_parallel(EXIT_INTERRUPTED)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # an internal failure: never leave other ranks hanging
        if debug:
            traceback.print_exc()
        else:
            _say(f"error: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        _abort_if_parallel(EXIT_INTERNAL)
        sys.exit(EXIT_INTERNAL)
    sys.exit(int(code or 0))


def _abort_if_parallel(code: int) -> None:
    if runtime.mpi_initialized():
        comm = runtime.world()
        if comm.size > 1:
            comm.Abort(code)
