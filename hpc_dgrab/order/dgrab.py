"""D-GraB: PairBalance coordinated across ranks through one running sum ``s``, the same on every rank.

The order data rides on the gradient message as its payload (no collective of its own):

* ``parallel`` (default): each rank signs its own pair differences against ``s`` (from inner
  products, :meth:`~hpc_dgrab.order.base.PairStep.signs`) and sends ``sum eps * c`` (d numbers);
  every rank adds the summed payload to ``s``, kept in the gradient's dtype.
* ``parallel`` with ``payload="half"``: each rank adds ``sum eps * c`` to its own residual and sends
  one of two halves of it per step (:func:`~hpc_dgrab.order.balance.send_block`: nothing is lost, an
  update waits at most one step); it signs against ``s`` plus its unsent sums. d/2 numbers.
* ``exact``: every rank receives every rank's raw differences bit for bit (a zero-padded sum) and
  runs the coordinated fold over ranks itself in float64
  (:func:`~hpc_dgrab.order.balance.balance_sign`). n x pairs x d numbers: for tests and small models.

``s`` changes only by element-wise additions of received sums and is reset every epoch. Every
payload ends with a small-integer digest of this rank's ``s`` (exact in float32); a step where the
ranks' sums differed is counted in ``diverged_steps`` and logged.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from hpc_dgrab.order.balance import Unit, balance_sign, payload_block, send_block
from hpc_dgrab.order.base import BalancingSorter
from hpc_dgrab.order.ghost import Units

log = logging.getLogger(__name__)

MODES = ("parallel", "exact")
#: payload name -> number of blocks the signed sum is cut into (one block sent per step)
PAYLOADS = {"full": 1, "half": 2}


def state_digest(s: Optional[np.ndarray], world_size: int) -> int:
    """A small integer fingerprint of ``s`` whose sum over ``world_size`` ranks is exact in float32."""
    if s is None:
        return 0
    bits = max(1, 23 - math.ceil(math.log2(max(world_size, 1))))
    raw = np.ascontiguousarray(s).reshape(-1).view(np.uint8)   # the bytes themselves, no copy
    return int.from_bytes(hashlib.sha256(raw.data).digest()[:4], "little") % (1 << bits)


class DGraB(BalancingSorter):
    """Coordinated PairBalance; ``mode`` is ``parallel`` (default) or ``exact``; ``payload`` (parallel
    mode) is ``full`` (the whole signed sum every step) or ``half`` (half of it, error feedback)."""

    name = "dgrab"
    options = ("units", "mode", "payload")

    def __init__(self, num_examples: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 units: str = "example", mode: str = "parallel", payload: str = "full") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown D-GraB mode {mode!r}; choose from {', '.join(MODES)}")
        if payload not in PAYLOADS:
            raise ValueError(f"unknown D-GraB payload {payload!r}; choose from {', '.join(PAYLOADS)}")
        if payload != "full" and mode != "parallel":
            raise ValueError(f"D-GraB payload {payload} needs mode parallel "
                             "(exact mode sends every difference)")
        self.mode, self.payload = mode, payload
        self.blocks = PAYLOADS[payload]
        self._step: List[Tuple[Unit, Unit]] = []
        self._digest = 0
        self._block = slice(0, 0)
        self._step_eps: List[int] = []
        self.signs: List[np.ndarray] = []  # this epoch's signs per step: (pairs,) own or (pairs, n) exact
        self.last_epoch_signs: List[np.ndarray] = []
        self.diverged_steps = 0  # steps at which the ranks' running sums were found to differ
        super().__init__(num_examples, seed=seed, rank=rank, world_size=world_size, units=units)

    def _reset_epoch(self) -> None:
        super()._reset_epoch()
        self._r: Optional[np.ndarray] = None  # this rank's unsent signed sums (payload "half")
        self._t = 0                           # steps observed this epoch (picks the block sent)

    def observe_units(self, unit_grads: Units, units: Sequence[Sequence[int]]) -> torch.Tensor:
        """Pair this step's units; return the payload to be summed over ranks with the gradient:
        the order data then one digest of this rank's running sum (see the module docstring)."""
        if self._step:
            raise RuntimeError("observe() called twice without apply_payload()")
        step = self._pair_step(unit_grads, units)
        d = unit_grads.d
        self._step = list(step.pairs)
        self._digest = state_digest(self._s, self.world_size)
        # in the units' dtype (the gradient's): the exchanger would cast it to that anyway
        dtype = unit_grads.dtype if unit_grads.dtype.is_floating_point else torch.float64
        if self.mode == "exact":
            payload = torch.zeros((self.world_size, len(step.pairs), d), dtype=dtype)
            if step.pairs:
                payload[self.rank] = torch.from_numpy(step.diffs()).to(dtype)
            return torch.cat([payload.reshape(-1), torch.tensor([self._digest], dtype=dtype)])
        # signs against the shared sum plus this rank's unsent sums and its earlier pairs of the step
        view = self._s
        if self._r is not None:
            view = self._r.copy() if self._s is None else self._r + self._s
        eps = step.signs(view)
        self._step_eps = eps.tolist()
        if self.blocks == 1:
            self._block = slice(0, d)
            payload = torch.zeros(d + 1, dtype=dtype)
            if step.pairs:
                step.signed_sum_into(eps, payload[:d])
        else:
            if self._r is None:
                self._r = np.zeros(d, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
            total = torch.zeros(d, dtype=dtype)
            if step.pairs:
                step.signed_sum_into(eps, total)
            self._block = payload_block(d, self.blocks, self._t)
            sent = send_block(self._r, total.numpy(), self._block)
            del total
            payload = torch.empty(sent.size + 1, dtype=dtype)
            payload[:-1] = torch.from_numpy(sent)
        payload[-1] = float(self._digest)
        self._t += 1
        return payload

    def apply_payload(self, payload_sum: Optional[torch.Tensor]) -> None:
        """Fold the summed payload into the shared running sum and place this rank's pairs."""
        if payload_sum is None:
            raise ValueError("D-GraB needs its payload summed over ranks (the exchanger returned None)")
        pay_t = torch.as_tensor(payload_sum).detach().cpu().reshape(-1)   # no-op on the host
        if pay_t.numel() < 1:
            raise ValueError("D-GraB: empty payload")
        digest_sum = float(pay_t[-1])
        if digest_sum != self.world_size * self._digest:
            self.diverged_steps += 1
            if self.diverged_steps == 1:
                log.warning("D-GraB: the ranks' running sums differ (epoch %d); orders stay valid "
                            "permutations but are no longer coordinated exactly", self.epoch)
        if self.mode == "exact":
            pay = pay_t[:-1].double().numpy()
            npairs = len(self._step)
            if npairs == 0:
                if pay.size:
                    raise ValueError("D-GraB: ranks disagree on the number of pairs in this step")
                self.signs.append(np.zeros((0, self.world_size), dtype=np.int64))
                return
            if pay.size % (self.world_size * npairs):
                raise ValueError("D-GraB: payload size does not match world size x pairs")
            diffs = pay.reshape(self.world_size, npairs, -1)
            s = self._running_sum(diffs.shape[2])
            eps = np.empty((npairs, self.world_size), dtype=np.int64)
            for k in range(npairs):
                for j in range(self.world_size):
                    eps[k, j] = balance_sign(s, diffs[j, k])
                    s += eps[k, j] * diffs[j, k]
            own = eps[:, self.rank]
            self.signs.append(eps)
        else:
            # kept in the dtype of the sums received (the gradient's): element-wise additions of the
            # same received numbers, so bit-identical on every rank
            pay = pay_t[:-1].numpy()
            blk = self._block
            if pay.size != blk.stop - blk.start:
                raise ValueError("D-GraB: payload size does not match this step's block")
            if self._step or self._r is not None:
                if self.blocks == 1:
                    d = blk.stop
                else:  # payload "half": the unsent sums exist from the first step on
                    assert self._r is not None
                    d = self._r.size
                s = self._running_sum(d, pay.dtype)
                s[blk] += pay
            own = np.asarray(self._step_eps, dtype=np.int64)
            self.signs.append(own)
        for (first, second), e in zip(self._step, own):
            self._reorder.place_pair(first, second, int(e))
        self._step, self._step_eps = [], []

    def next_order(self) -> np.ndarray:
        if self._step:
            raise RuntimeError("end_epoch() with a step whose payload was never applied")
        self.last_epoch_signs, self.signs = self.signs, []
        return super().next_order()

    @property
    def running_sum(self) -> Optional[np.ndarray]:
        """The shared running sum of the current epoch (None before the first pair)."""
        return self._s

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update({"mode": self.mode, "payload": self.payload, "step_in_epoch": self._t,
                      "residual": None if self._r is None else self._r.copy()})
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"checkpoint used D-GraB mode {state['mode']}, not {self.mode}")
        if state.get("payload", "full") != self.payload:   # checkpoints before the option sent it all
            raise ValueError(f"checkpoint used D-GraB payload {state.get('payload', 'full')}, "
                             f"not {self.payload}")
        super().load_state_dict(state)
        self._t = int(state.get("step_in_epoch", 0))
        r = state.get("residual")
        self._r = None if r is None else np.array(r)
