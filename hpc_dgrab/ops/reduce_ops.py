"""Reduction operations: Horovod's constants and what each means for a tensor.

``Average`` (the default), ``Sum``, ``Min``, ``Max``, ``Product`` are plain ints (Horovod's values),
so ``op=hvd.Sum`` and comparisons work as in Horovod. ``Adasum`` is accepted as a name but refused
with a one-line :class:`~hpc_dgrab.ops.exceptions.OpArgumentError`: it is not implemented here.
An ``Average`` of an integer tensor truncates toward zero (as Horovod does).
"""
from __future__ import annotations

from typing import Any, Optional

from hpc_dgrab.ops.exceptions import OpArgumentError

Average = 0
Sum = 1
Adasum = 2
Min = 3
Max = 4
Product = 5

NAMES = {Average: "Average", Sum: "Sum", Adasum: "Adasum", Min: "Min", Max: "Max", Product: "Product"}


def resolve(op: Optional[int], average: Optional[bool], what: str) -> int:
    """The op to use from Horovod's ``op``/deprecated ``average`` arguments (default ``Average``)."""
    if op is not None and average is not None:
        raise OpArgumentError(f"{what}: pass op= or the deprecated average=, not both")
    if op is None:
        op = Sum if average is False else Average
    if op == Adasum:
        raise OpArgumentError(f"{what}: op=Adasum is not supported by hpc_dgrab; use op=Average or op=Sum")
    if op not in NAMES:
        raise OpArgumentError(f"{what}: unknown op {op!r}; use Average, Sum, Min, Max or Product")
    return int(op)


def mpi_op(op: int) -> Any:
    """The MPI reduction for ``op`` (``Average`` reduces with a sum, then divides)."""
    from mpi4py import MPI

    return {Average: MPI.SUM, Sum: MPI.SUM, Min: MPI.MIN, Max: MPI.MAX, Product: MPI.PROD}[op]
