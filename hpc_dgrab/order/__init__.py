"""Example ordering: one file per sorter, all with the :class:`~hpc_dgrab.order.base.Sorter` interface.

``rr`` (random reshuffling per rank), ``grab`` (GraB MeanBalance with the stale mean), ``pairbalance``
(PairBalance per rank; the "independent" baseline on N ranks) and ``dgrab`` (PairBalance coordinated
across ranks through one shared running sum; modes ``parallel`` and ``exact``). The balancing
kernels are pure numpy (:mod:`hpc_dgrab.order.balance`), the units torch (:mod:`hpc_dgrab.order.units`).
"""
from hpc_dgrab.order.base import SORTERS, BalancingSorter, GradSorter, Sorter, make_sorter  # noqa: F401
