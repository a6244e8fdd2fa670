"""Example ordering: one file per sorter, all with the :class:`~hpc_dgrab.order.base.Sorter` interface."""
from hpc_dgrab.order.base import Sorter, make_sorter  # noqa: F401
