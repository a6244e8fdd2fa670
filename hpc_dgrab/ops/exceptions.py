"""Exception types of the Horovod-shaped operations (:mod:`hpc_dgrab.ops`).

Horovod's own names are kept so that ``except hvd.HorovodInternalError`` works unchanged. The two
errors that a user's mistake raises also derive from :class:`~hpc_dgrab.errors.UserError` (one line,
``collective=True`` when every rank raises it together):

* :class:`OpMismatchError` (a ``RuntimeError``): the ranks submitted the same operation with
  different shapes, dtypes, ops, roots or scale factors, or waited on names the others never
  submitted. Every rank taking part gets the same message.
* :class:`OpArgumentError` (a ``ValueError`` and ``RuntimeError``): a bad argument found on this
  rank alone (a duplicate pending name, splits that do not add up, a process set this rank is not
  in, ``Adasum``).
"""
from __future__ import annotations

from hpc_dgrab.errors import UserError


class HorovodInternalError(RuntimeError):
    """The operations' engine failed or was shut down while an operation was pending."""


class HostsUpdatedInterrupt(RuntimeError):
    """Horovod raises it when elastic membership changes; here only for ``except`` clauses."""

    def __init__(self, skip_sync: bool = False) -> None:
        super().__init__("hosts updated")
        self.skip_sync = skip_sync


class OpMismatchError(UserError, RuntimeError):
    """The ranks disagree about one operation; raised with the same message on every rank."""

    def __init__(self, message: str) -> None:
        UserError.__init__(self, message, collective=True)


class OpArgumentError(UserError, ValueError, RuntimeError):
    """A bad argument to an operation, found on this rank (a ``ValueError``; also a ``RuntimeError``,
    which Horovod raises for some of the same mistakes)."""

    def __init__(self, message: str) -> None:
        UserError.__init__(self, message, collective=False)
