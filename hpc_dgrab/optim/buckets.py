"""Gradient buckets of ``DistributedOptimizer``: fixed flat buffers that the parameters' ``.grad``
are views into, and the rule that groups parameters into them.

:func:`bucket_groups` lays parameters out, in backward order, into groups of one dtype and device:
the first closes at ``FIRST_BUCKET_MB`` (communication starts early), the others at the cap, a
parameter of at least ``ALONE_MB`` is alone (its bucket adopts autograd's gradient, so that it is
in memory once), and the last group (sent with the step's payloads after backward) holds only the
trailing parameters that fit in ``FINAL_BUCKET_MB``. :class:`Bucket` holds one group's buffer.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Tuple

import torch

from hpc_dgrab.comm.transport import Handle

log = logging.getLogger(__name__)

#: size at which the first bucket (the last layers' gradients, produced first) is started
FIRST_BUCKET_MB = 1.0
#: the gradients left for the final message (sent with the payloads after backward)
FINAL_BUCKET_MB = 1.0
#: a parameter of at least this size (or the cap, if smaller) gets a bucket of its own, which
#: adopts autograd's gradient instead of copying it (the gradient is then in memory once)
ALONE_MB = 1.0
#: a payload region of the last bucket larger than this is given back after each step (a long
#: payload, such as D-GraB's order data, then takes no memory outside synchronize())
KEEP_PAYLOAD_MB = 1.0


class Payload:
    """A tensor summed over ranks with the step's gradient; ``value`` holds the sum afterwards."""

    def __init__(self, tensor: torch.Tensor,
                 on_result: Optional[Callable[[torch.Tensor], Any]] = None) -> None:
        self.tensor = tensor.detach().reshape(-1)
        self.on_result = on_result
        #: the sum over ranks after synchronize(); on the dense path, for a payload in the
        #: gradients' dtype, a view into the step's message (valid until the next synchronize())
        self.value: Optional[torch.Tensor] = None

    @property
    def numel(self) -> int:
        return self.tensor.numel()



def is_view_of(grad: Optional[torch.Tensor], slot: torch.Tensor) -> bool:
    """True when ``grad`` is exactly the view ``slot`` (same memory, shape, strides, dtype)."""
    return grad is not None and grad.data_ptr() == slot.data_ptr() and grad.shape == slot.shape \
        and grad.stride() == slot.stride() and grad.dtype == slot.dtype


class Bucket:
    """A flat buffer holding the gradients of some parameters (views), plus its in-flight handle.

    ``buf`` is the gradient region; ``store`` is ``buf`` followed by ``reserve`` spare entries where
    the last bucket carries the step's extras, so that its message is a prefix of ``store`` (no copy).

    A bucket of ONE parameter that carries no extras is *adoptable*: ``release()`` (from
    ``zero_grad(set_to_none=True)``) lets go of its buffer, and the next backward's fresh gradient
    becomes the buffer itself (``adopt``) instead of being copied into a preallocated slot. The
    largest parameter's gradient is then never in memory twice (autograd's tensor and its copy),
    and the hook saves one pass over it.
    """

    def __init__(self, index: int, params: List[torch.Tensor], dtype: torch.dtype, device: torch.device,
                 reserve: int = 0) -> None:
        self.index = index
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.dtype, self.device, self.reserve, self.base_reserve = dtype, device, reserve, reserve
        self.adoptable = len(params) == 1 and reserve == 0
        self.offsets: List[int] = []
        off = 0
        for p in params:
            self.offsets.append(off)
            off += p.numel()
        self._store: Optional[torch.Tensor] = None
        self.buf = torch.empty(0)
        self._set_store(torch.zeros(self.numel + reserve, dtype=dtype, device=device))
        self.pending = len(params)    # parameters still missing their gradients this step
        self.handle: Optional[Handle] = None
        self.message: Optional[torch.Tensor] = None  # buf, or [buf | payloads | used] for the last bucket

    def _set_store(self, store: torch.Tensor) -> None:
        self._store = store
        self.buf = store[:self.numel]

    @property
    def store(self) -> torch.Tensor:
        """The buffer (allocated, zero-filled, if released)."""
        store = self._store
        if store is None:
            store = torch.zeros(self.numel + self.reserve, dtype=self.dtype, device=self.device)
            self._set_store(store)
        return store

    @property
    def held(self) -> bool:
        return self._store is not None

    def release(self) -> None:
        """Let go of an adoptable bucket's buffer (its parameter's ``.grad`` was set to None)."""
        if self.adoptable:
            self._store = None
            self.buf = torch.empty(0)

    def adopt(self, grad: Optional[torch.Tensor]) -> bool:
        """Make ``grad`` (a fresh gradient of this bucket's one parameter) the released buffer, when it
        is a whole contiguous tensor of the right type: True if adopted."""
        p = self.params[0]
        if not self.adoptable or self._store is not None or grad is None or grad.shape != p.shape \
                or grad.dtype != self.dtype or grad.device != self.device or not grad.is_contiguous() \
                or grad.storage_offset() != 0 or grad.untyped_storage().nbytes() != grad.nbytes:
            return False
        self._set_store(grad.detach().view(-1))
        return True

    def slot(self, k: int) -> torch.Tensor:
        p = self.params[k]
        store = self.store
        return store[self.offsets[k]:self.offsets[k] + p.numel()].view_as(p)

    def message_with(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """``[gradients | parts...]`` as a prefix of ``store`` (grown once, gradient views re-pointed);
        each part is copied into its region in the gradients' dtype (no intermediate copy)."""
        need = self.numel + sum(t.numel() for t in parts)
        if need > self.store.numel():
            # every element of the message is written below (gradients, then each part): no zero-fill
            store = torch.empty(need + 64, dtype=self.dtype, device=self.device)
            store[:self.numel].copy_(self.buf)
            self._set_store(store)
            self.reserve = need + 64 - self.numel
            for k, p in enumerate(self.params):
                p.grad = self.slot(k)
        msg = self.store[:need]
        off = self.numel
        for t in parts:
            msg[off:off + t.numel()].copy_(t.reshape(-1))
            off += t.numel()
        return msg

    def shrink(self) -> None:
        """Give back a payload region grown past ``KEEP_PAYLOAD_MB`` (the gradients are copied into a
        buffer of their own size plus the initial reserve, and their views re-pointed)."""
        old = self._store
        if old is None or (old.numel() - self.numel - self.base_reserve) * old.element_size() \
                <= KEEP_PAYLOAD_MB * 2 ** 20:
            return
        self._set_store(torch.zeros(self.numel + self.base_reserve, dtype=self.dtype, device=self.device))
        self.buf.copy_(old[:self.numel])
        self.reserve = self.base_reserve
        for k, p in enumerate(self.params):
            if p.grad is not None and p.grad.untyped_storage().data_ptr() == old.untyped_storage().data_ptr():
                p.grad = self.slot(k)


def bucket_groups(params: List[torch.Tensor], cap_mb: float) -> List[List[torch.Tensor]]:
    """Consecutive groups of ``params`` (in backward order) of one dtype and device.

    The LAST group (it waits for ``synchronize()`` because it carries the payloads) holds only
    the trailing parameters that fit in ``FINAL_BUCKET_MB``, so that little is left to send
    after backward; it is empty (a message of the payloads alone) when the last parameter is
    large. A parameter of at least ``ALONE_MB`` (or the cap) is a group of its own, so that its
    bucket adopts autograd's gradient. Before the last, as in DDP, the first group closes once
    it reaches ``FIRST_BUCKET_MB`` (communication starts early) and the others at ``cap_mb``.
    """
    def nbytes(p: torch.Tensor) -> int:
        return p.numel() * p.element_size()

    def kind(p: torch.Tensor) -> Tuple[torch.dtype, torch.device]:
        return (p.dtype, p.device)

    if not params:
        return []
    alone = min(ALONE_MB, cap_mb) * 2 ** 20
    tail: List[torch.Tensor] = []
    size: float = 0   # bytes so far; infinite once a group is closed
    for p in reversed(params):
        if nbytes(p) >= alone or (tail and kind(p) != kind(tail[0])) \
                or size + nbytes(p) > min(FINAL_BUCKET_MB, cap_mb) * 2 ** 20:
            break
        tail.insert(0, p)
        size += nbytes(p)
    groups: List[List[torch.Tensor]] = []
    size = 0
    for p in params[:len(params) - len(tail)]:
        cap = min(FIRST_BUCKET_MB if len(groups) == 1 else cap_mb, cap_mb) * 2 ** 20
        if nbytes(p) >= alone:
            groups.append([p])
            size = float("inf")   # closed: the next parameter starts a group
        elif groups and kind(groups[-1][0]) == kind(p) and size < cap:
            groups[-1].append(p)    # DDP's rule: a bucket closes once it has reached its cap
            size += nbytes(p)
        else:
            groups.append([p])
            size = nbytes(p)
    return groups + [tail]
