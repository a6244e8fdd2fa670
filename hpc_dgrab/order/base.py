"""The sorter interface: a per-rank, per-epoch order over this rank's local examples."""
from __future__ import annotations

from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
    runtime_checkable,
)

import numpy as np
import torch

from hpc_dgrab.order.balance import Reorder, Unit, balance_sign, herd_signs
from hpc_dgrab.order.ghost import DenseUnits, PrependRow, Units
from hpc_dgrab.order.units import check_units, parse_units, step_units


class Sorter(torch.utils.data.Sampler):
    """Order of this rank's ``num_examples`` local examples, one permutation per epoch.

    Usable as a torch ``Sampler`` (iterates the current epoch's order). Sorters that learn from
    gradients set ``needs_grads = True`` and receive each step's balancing units; every sorter's
    state round-trips through ``state_dict``/``load_state_dict`` so a resumed run continues with
    the same order.
    """

    name = "base"
    needs_grads = False
    options: Tuple[str, ...] = ()  # keyword options of make_sorter this sorter accepts

    def __init__(self, num_examples: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if num_examples < 1:
            raise ValueError(f"a sorter needs at least one example, got {num_examples}")
        self.num_examples = int(num_examples)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self._order = self.first_order()

    def first_order(self) -> np.ndarray:
        """The first epoch's order: a permutation seeded by (seed, rank)."""
        return np.random.default_rng([self.seed, self.rank]).permutation(self.num_examples)

    def epoch_order(self) -> np.ndarray:
        """This epoch's order of local example indices (a permutation of 0..num_examples-1)."""
        return self._order

    def end_epoch(self) -> None:
        """Advance to the next epoch (computes the next order)."""
        self.epoch += 1
        self._order = self.next_order()

    def next_order(self) -> np.ndarray:
        raise NotImplementedError

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ValueError (one line) if this sorter cannot work with ``model``."""

    def __iter__(self) -> Iterator[int]:
        return iter(self._order.tolist())

    def __len__(self) -> int:
        return self.num_examples

    def state_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "epoch": self.epoch, "order": self._order.copy(),
                "num_examples": self.num_examples, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("name") != self.name or state.get("num_examples") != self.num_examples:
            raise ValueError(f"checkpoint holds a {state.get('name')} order of {state.get('num_examples')} "
                             f"examples, not {self.name} of {self.num_examples}")
        epoch, order = state.get("epoch"), state.get("order")
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"checkpoint holds order epoch {epoch!r}, not an integer >= 0")
        order = np.asarray(order)
        n = self.num_examples
        if order.shape != (n,) or order.dtype.kind not in "iu" or \
                not np.array_equal(np.sort(order), np.arange(n)):
            raise ValueError(f"checkpoint's example order is not a permutation of this rank's {n} examples")
        self.epoch = int(epoch)
        self._order = order.astype(np.int64)


@runtime_checkable
class GradSorter(Protocol):
    """The seam between a driver and a sorter that learns from gradients (``needs_grads = True``;
    :class:`BalancingSorter` implements it): per step ``balance_step``, then after the gradient
    exchange ``apply_payload`` with the step's payload summed over ranks."""

    name: str

    def check_model(self, model: torch.nn.Module) -> None:
        ...

    def balance_step(self, model: torch.nn.Module,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, indices: Union[Sequence[int], np.ndarray]
                     ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        ...

    def apply_payload(self, payload_sum: Optional[torch.Tensor]) -> None:
        ...


class PairStep:
    """One step's units paired up (after a unit left over from the previous step).

    ``units`` answers the inner products (see :mod:`hpc_dgrab.order.ghost`); pair k is
    ``(pairs[k][0], pairs[k][1])`` with difference ``c_k = g[a[k]] - g[b[k]]`` (rows of ``units``).
    """

    def __init__(self, units: Units, pairs: List[Tuple[Unit, Unit]], a: np.ndarray, b: np.ndarray) -> None:
        self.units, self.pairs, self.a, self.b = units, pairs, a, b

    def signs(self, s: Optional[np.ndarray]) -> np.ndarray:
        """eps_k of each pair balanced in turn against ``s`` plus this step's earlier pairs."""
        if not self.pairs:
            return np.zeros(0, dtype=np.int64)
        base, cross = self.units.pair_products(None if s is None or not s.any() else s, self.a, self.b)
        return herd_signs(base, cross)

    def _weights(self, eps: np.ndarray) -> np.ndarray:
        w = np.zeros(self.units.n)
        np.add.at(w, self.a, eps)
        np.add.at(w, self.b, -eps)
        return w

    def signed_sum(self, eps: np.ndarray) -> np.ndarray:
        """``sum_k eps_k c_k`` (float64, d)."""
        return self.units.weighted_sum(self._weights(eps))[0]

    def signed_sum_into(self, eps: np.ndarray, out: torch.Tensor) -> None:
        """``out[:] = sum_k eps_k c_k`` in ``out``'s dtype (no float64 d-vector for ghost units)."""
        self.units.weighted_sum_into(self._weights(eps), out)

    def diffs(self) -> np.ndarray:
        """The differences themselves (pairs, d), float64."""
        if not self.pairs:
            return np.zeros((0, self.units.d))
        return self.units.rows(self.a.tolist()) - self.units.rows(self.b.tolist())


class BalancingSorter(Sorter):
    """A sorter that learns the next order from this epoch's gradients (GraB family).

    Per step the driver calls ``balance_step(model, loss_fn, x, y, indices)``, which computes the
    step's units (per-example gradients held implicitly as layer factors where the model allows,
    else ``torch.func`` or micro-batch gradients, :mod:`hpc_dgrab.order.units`), returns
    ``(loss, step gradient, payload)`` and hands the units to :meth:`observe_units`; after the
    gradient exchange it calls ``apply_payload(payload summed over ranks)``. ``observe`` takes a
    materialised (U, d) matrix instead (the array-level hook, usable without a model). Signs are
    decided from inner products only (``<s, g_i>`` and ``<g_i, g_j>`` within the step). Units pair
    up across step boundaries; an odd unit left at the end of the epoch is balanced alone; examples
    never visited (a rank with more examples than the common step count) keep their relative order
    in the middle of the next order.
    """

    needs_grads = True
    options: Tuple[str, ...] = ("units",)

    def __init__(self, num_examples: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 units: str = "example") -> None:
        parse_units(units)
        self.units = units
        super().__init__(num_examples, seed=seed, rank=rank, world_size=world_size)
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self._reorder = Reorder()
        self._pending: Optional[Tuple[Unit, np.ndarray]] = None  # an unpaired unit and its float64 gradient
        self._s: Optional[np.ndarray] = None  # running sum (float64), allocated at the first unit

    def check_model(self, model: torch.nn.Module) -> None:
        check_units(model, self.units)

    def balance_step(self, model: torch.nn.Module,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, indices: Union[Sequence[int], np.ndarray]
                     ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(mean loss, step gradient, payload to sum over ranks or None) for this rank's batch."""
        loss, grad, unit_grads, slices = step_units(model, loss_fn, x, y, self.units)
        idx = np.asarray(indices, dtype=np.int64)
        units = [tuple(idx[sl].tolist()) for sl in slices]
        return loss, grad, self.observe_units(unit_grads, units)

    def observe(self, unit_grads: Union[torch.Tensor, np.ndarray],
                units: Sequence[Sequence[int]]) -> Optional[torch.Tensor]:
        """Take one step's unit gradients ((U, d) tensor or array, row i = ``units[i]``)."""
        return self.observe_units(DenseUnits(unit_grads), units)

    def observe_units(self, unit_grads: Units, units: Sequence[Sequence[int]]) -> Optional[torch.Tensor]:
        """Take one step's units as an object answering ``dots``/``gram``/``weighted_sum``/``rows``
        (:class:`~hpc_dgrab.order.ghost.DenseUnits`, :class:`~hpc_dgrab.order.ghost.GhostUnits`)."""
        raise NotImplementedError

    def apply_payload(self, payload_sum: Optional[torch.Tensor]) -> None:
        """Receive the step's payload summed over ranks (None when the sorter sent none)."""

    def _running_sum(self, d: int, dtype: Any = np.float64) -> np.ndarray:
        if self._s is None:
            self._s = np.zeros(d, dtype=dtype)
        return self._s

    def _pair_step(self, unit_grads: Units, units: Sequence[Sequence[int]]) -> PairStep:
        """Pair this step's units (after a pending one); keep an odd last unit pending."""
        seq: List[Unit] = [tuple(int(i) for i in u) for u in units]
        ug = unit_grads
        if self._pending is not None:
            seq.insert(0, self._pending[0])
            ug = PrependRow(self._pending[1], unit_grads)
            self._pending = None
        if len(seq) % 2:
            last = len(seq) - 1
            self._pending = (seq.pop(), ug.rows([last])[0])
        a = np.arange(0, len(seq), 2, dtype=np.int64)
        return PairStep(ug, [(seq[k], seq[k + 1]) for k in a.tolist()], a, a + 1)

    def _finish_pending(self, s: Optional[np.ndarray]) -> None:
        """Balance a last unpaired unit alone against ``s``."""
        if self._pending is not None:
            unit, g = self._pending
            self._reorder.place(unit, balance_sign(s if s is not None else np.zeros_like(g), g))
            self._pending = None

    def next_order(self) -> np.ndarray:
        self._finish_pending(self._s)
        order = self._reorder.finish(self._order)
        self._reset_epoch()
        return order

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update({"units": self.units, "reorder": self._reorder.state_dict(),
                      "s": None if self._s is None else self._s.copy(),
                      "pending": None if self._pending is None else
                      (list(self._pending[0]), torch.from_numpy(self._pending[1].copy()))})
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("units", self.units) != self.units:
            raise ValueError(f"checkpoint balanced {state['units']} units, not {self.units}")
        self._reset_epoch()
        self._reorder.load_state_dict(state.get("reorder", {}))
        s = None if state.get("s") is None else np.asarray(state["s"])
        if s is not None:
            s = s.astype(s.dtype if s.dtype in (np.float32, np.float64) else np.float64)
        self._s = s
        pending = state.get("pending")
        if pending is not None:
            if not all(0 <= int(i) < self.num_examples for i in pending[0]):
                raise ValueError(f"checkpoint's pending example indices leave 0..{self.num_examples - 1}")
            self._pending = (tuple(int(i) for i in pending[0]),
                             torch.as_tensor(pending[1]).double().numpy().reshape(-1).copy())


SORTERS = ("rr", "grab", "pairbalance", "dgrab")


def make_sorter(name: str, num_examples: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                **options: Any) -> Sorter:
    """Build the sorter called ``name`` (``rr``, ``grab``, ``pairbalance``, ``dgrab``) for this rank.

    ``options`` (``units="example"|"microbatch:K"``, ``mode="parallel"|"exact"`` and
    ``payload="full"|"half"`` for dgrab) are passed
    to the sorters that take them and ignored by the others; bad values raise ValueError.
    """
    from hpc_dgrab.order.dgrab import DGraB
    from hpc_dgrab.order.grab import GraB
    from hpc_dgrab.order.pairbalance import PairBalance
    from hpc_dgrab.order.rr import RandomReshuffling

    sorters = {cls.name: cls for cls in (RandomReshuffling, GraB, PairBalance, DGraB)}
    if name not in sorters:
        raise ValueError(f"unknown order {name!r}; choose from {', '.join(SORTERS)}")
    cls = sorters[name]
    kwargs = {k: v for k, v in options.items() if k in cls.options and v is not None}
    return cls(num_examples, seed=seed, rank=rank, world_size=world_size, **kwargs)
