"""Horovod's reduction-op constants, in one place: ``hd.Average`` (the default of
``DistributedOptimizer``), ``hd.Sum``, ``hd.Adasum`` (refused: not implemented), ``hd.Min``,
``hd.Max``, ``hd.Product``. Plain strings, so they compare, print and pickle as themselves.
"""
from __future__ import annotations

import logging

from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["Adasum", "Average", "Max", "Min", "OPS", "Product", "Sum", "check_gradient_op"]

Average = "average"
Sum = "sum"
Adasum = "adasum"
Min = "min"
Max = "max"
Product = "product"

#: every op name
OPS = (Average, Sum, Adasum, Min, Max, Product)


def check_gradient_op(op: str, gradient_predivide_factor: float) -> None:
    """Refuse what ``DistributedOptimizer`` cannot do with a one-line UserError: an op other than
    Average or Sum (Adasum is not implemented here), or a predivide factor without Average."""
    if op == Adasum:
        raise UserError("op=Adasum is not supported by hpc_dgrab; use op=hd.Average (the default) or hd.Sum")
    if op not in (Average, Sum):
        raise UserError(f"DistributedOptimizer: op must be hd.Average or hd.Sum, got {op!r}")
    if not gradient_predivide_factor > 0:
        raise UserError(f"gradient_predivide_factor must be > 0, got {gradient_predivide_factor}")
    if gradient_predivide_factor != 1.0 and op != Average:
        raise UserError("gradient_predivide_factor is only valid with op=hd.Average")
