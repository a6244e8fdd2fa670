"""The ``torch.distributed`` transport: :class:`TorchTransport`, collectives over a process group
(gloo on CPU, NCCL on GPUs).

Contract (beyond :mod:`hpc_dgrab.comm.transport`; collectives only, gossip keeps running over MPI):

* ``TorchTransport(comm=None, backend=None, group=None, timeout_s=None)``. ``backend``: "gloo" or
  "nccl"; None = :func:`default_backend` (NCCL when CUDA and NCCL are available, else gloo;
  ``DistributedOptimizer(backend="torch")`` asks it for its parameters' device).
  ``group``: a process group of the caller's (used as it is, never destroyed). Otherwise the
  transport works on a private ``new_group`` of its own (the analogue of MPI's ``Dup``), made over
  the default process group; the constructor is collective.
* **The default process group**, when nobody has initialised it: from the MPI world (``comm``, default
  ``MPI.COMM_WORLD`` when an MPI launcher started the process) rank 0 takes ``MASTER_ADDR`` if set,
  else 127.0.0.1 when every rank runs on its host, else its hostname's address, opens the
  rendezvous store there on a free port the OS picks, broadcasts address and port over MPI, and
  every rank joins with ``init_process_group(backend, store=..., rank=comm.rank,
  world_size=comm.size)``. Without MPI: ``RANK``/``WORLD_SIZE``/
  ``MASTER_ADDR``/``MASTER_PORT`` (torchrun), else ``SLURM_PROCID``/``SLURM_NTASKS`` with
  ``MASTER_ADDR``/``MASTER_PORT``, else a single process. Environment variables are read only
  through :func:`hpc_dgrab.runtime.env`. A default group initialised by the user is used as is,
  if its rank and size agree with ``comm``'s.
* ``allreduce_async_`` is ``dist.all_reduce(async_op=True)``; ``handle.wait()`` waits for it, copies
  back when the tensor was not contiguous (gloo and NCCL reduce contiguous memory only) and divides
  for ``average``. ``allgather`` is one ``all_gather_single`` (``all_gather_into_tensor`` on older
  torch); ``allgatherv`` pads every rank's rows to the longest, gathers once and cuts (the row
  counts by one small all-gather when not given); ``broadcast_`` is ``dist.broadcast``. Results stay
  on the input's device: no host copy of a CUDA tensor. On NCCL a host tensor is copied to the
  current CUDA device for the collective and back (NCCL moves device memory only).
* ``close()`` is collective: it waits for this transport's unfinished operations, meets the other
  ranks in a barrier on its group (bounded by :data:`CLOSE_WAIT_S` on gloo), then destroys the group;
  the last transport to close destroys the default group too when hpc_dgrab created it. Idempotent.
  A ``weakref.finalize`` does the same when the transport is collected or at interpreter exit (in
  the Python ``atexit`` phase, before MPI finalises), and
  :func:`hpc_dgrab.comm.transport.close_all` (``hd.shutdown()``) closes every live one in order.
"""
from __future__ import annotations

import datetime
import logging
import socket
import weakref
from typing import Any, List, Optional, Sequence, Tuple

import torch

from hpc_dgrab import runtime
from hpc_dgrab.comm import transport as _transport
from hpc_dgrab.comm.transport import Done, Handle
from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
#: how long close() waits in its barrier for the other ranks (a rank whose peers never come, e.g. at
#: exit after an error, must not hang): the group is then left to the OS
CLOSE_WAIT_S = 30.0


def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this torch has no torch.distributed; use backend='mpi'")
    return dist


def default_backend(device: Any = None) -> str:
    """"nccl" when NCCL is available and ``device`` is a CUDA device (``device`` None: when CUDA is
    available), else "gloo"."""
    dist = _dist()
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "nccl" if cuda and dist.is_nccl_available() else "gloo"


def _check_backend(backend: str) -> str:
    dist = _dist()
    if backend not in BACKENDS:
        raise UserError(f"unknown torch.distributed backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    if backend == "nccl" and not (dist.is_nccl_available() and torch.cuda.is_available()):
        raise UserError("the nccl backend needs CUDA and a torch built with NCCL; use backend='gloo'")
    if backend == "gloo" and not dist.is_gloo_available():
        raise UserError("this torch has no gloo; use backend='mpi'")
    return backend


def _timeout(timeout_s: Optional[float]) -> Optional[datetime.timedelta]:
    return None if timeout_s is None else datetime.timedelta(seconds=timeout_s)


# ---------------------------------------------------------------------------------------- default group
class _World:
    """The default process group as hpc_dgrab holds it: whether hpc_dgrab created it (then it
    destroys it when the last transport on it closes), its rendezvous store, the transports on it."""

    owned = False
    store: Any = None
    refs = 0


def _root_address(hosts: Sequence[str]) -> str:
    """Where rank 0 opens the rendezvous store, given every rank's hostname."""
    given = runtime.env("MASTER_ADDR")
    if given:
        return given
    if len(set(hosts)) == 1:
        return "127.0.0.1"
    addr = socket.gethostbyname(socket.gethostname())
    if addr.startswith("127."):   # e.g. Debian's 127.0.1.1 for the hostname: unreachable from others
        raise UserError(f"the hostname {socket.gethostname()} resolves to {addr} and ranks run on "
                        f"{len(set(hosts))} hosts; set MASTER_ADDR to rank 0's reachable address")
    return addr


def _rendezvous_mpi(comm: Any, backend: str, timeout: Optional[datetime.timedelta]) -> Any:
    """Every rank of ``comm`` joins one default group; rank 0 hosts the store. Returns the store."""
    dist = _dist()
    hosts = comm.allgather(socket.gethostname())
    store: Any = None
    kw = {} if timeout is None else {"timeout": timeout}
    where: Tuple[str, Any] = ("", None)
    if comm.rank == 0:
        try:
            addr = _root_address(hosts)
            store = dist.TCPStore(addr, 0, comm.size, True, wait_for_workers=False, **kw)
            where = (addr, int(store.port))
        except Exception as exc:  # every rank must hear of it, not wait for a port
            where = ("", f"{type(exc).__name__}: {exc}".splitlines()[0])
    addr, port = comm.bcast(where, root=0)
    if not addr:
        raise RuntimeError(f"torch transport: rank 0 could not open the rendezvous store ({port})")
    if comm.rank != 0:
        store = dist.TCPStore(addr, port, comm.size, False, **kw)
    dist.init_process_group(backend, store=store, rank=comm.rank, world_size=comm.size, **kw)
    log.debug("torch transport: default %s group of %d ranks via %s:%d", backend, comm.size, addr, port)
    return store


def _rendezvous_env(backend: str, timeout: Optional[datetime.timedelta]) -> Any:
    """The default group from torchrun's or Slurm's variables (a single process without either)."""
    dist = _dist()
    kw = {} if timeout is None else {"timeout": timeout}
    rank, size = runtime.env("RANK"), runtime.env("WORLD_SIZE")
    if rank is None or size is None:
        rank, size = runtime.env("SLURM_PROCID"), runtime.env("SLURM_NTASKS")
    addr, port = runtime.env("MASTER_ADDR"), runtime.env("MASTER_PORT")
    if rank is None or size is None or int(size) == 1:
        store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False, **kw)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, **kw)
        return store
    if not addr or not port:
        raise UserError("torch.distributed without MPI needs MASTER_ADDR and MASTER_PORT (torchrun sets "
                        "them; under Slurm export them, or launch with srun --mpi=pmix / mpirun)")
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=int(rank),
                            world_size=int(size), **kw)
    return None


def _acquire_world(comm: Optional[Any], backend: str, timeout: Optional[datetime.timedelta]) -> None:
    """Make sure the default group exists (creating it as the module docstring says); count a user."""
    dist = _dist()
    if dist.is_initialized():
        if comm is not None and (dist.get_rank() != comm.rank or dist.get_world_size() != comm.size):
            raise UserError(f"torch.distributed is initialised as rank {dist.get_rank()} of "
                            f"{dist.get_world_size()}, but the communicator has rank {comm.rank} of "
                            f"{comm.size}")
    else:
        if comm is None and runtime.launched_by_mpi():
            comm = runtime.world()
        if comm is not None:
            _World.store = _rendezvous_mpi(comm, backend, timeout)
        else:
            _World.store = _rendezvous_env(backend, timeout)
        _World.owned = True
        _World.refs = 0
    _World.refs += 1


def _release_world() -> None:
    """One user fewer; the last one destroys the default group if hpc_dgrab created it."""
    _World.refs = max(0, _World.refs - 1)
    if _World.refs or not _World.owned:
        return
    dist = _dist()
    _World.owned = False
    if dist.is_initialized():
        dist.destroy_process_group()
    _World.store = None
    log.debug("torch transport: default group destroyed")


# ---------------------------------------------------------------------------------------- handles
class _TorchHandle:
    """``tensor`` gets the result; the collective ran on ``work_tensor`` (``tensor`` itself, or its
    contiguous copy)."""

    __slots__ = ("_work", "_tensor", "_buf", "_average", "_size", "_done")

    def __init__(self, work: Any, tensor: torch.Tensor, buf: torch.Tensor, average: bool, size: int) -> None:
        self._work = work
        self._tensor = tensor
        self._buf = buf
        self._average = average
        self._size = size
        self._done = False

    def test(self) -> bool:
        return self._done or bool(self._work.is_completed())

    def wait(self) -> torch.Tensor:
        if not self._done:
            self._work.wait()
            if self._buf is not self._tensor:
                self._tensor.copy_(self._buf)
            if self._average:
                self._tensor.div_(self._size)
            self._done = True
            self._buf = self._tensor
        return self._tensor


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(1) if tensor.dim() == 0 else tensor


# ---------------------------------------------------------------------------------------- resources
class _Resources:
    """What a transport must give back: its group and its unfinished operations. Holds no reference
    to the transport, so the transport's finalizer can own it."""

    def __init__(self, group: Any, owns_group: bool, backend: str) -> None:
        self.group = group
        self.owns_group = owns_group
        self.backend = backend
        self.pending: List[Any] = []    # works started and perhaps unfinished, in order
        self.closed = False

    def track(self, work: Any) -> None:
        pending = self.pending
        while pending and pending[0].is_completed():
            pending.pop(0)
        pending.append(work)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        dist = _dist()
        pending, self.pending = self.pending, []
        try:
            for work in pending:
                work.wait()
            if self.owns_group and dist.is_initialized():
                if self.backend == "gloo":
                    dist.monitored_barrier(group=self.group, timeout=_timeout(CLOSE_WAIT_S),
                                           wait_all_ranks=True)
                else:
                    dist.barrier(group=self.group)
                dist.destroy_process_group(self.group)
        except Exception as exc:  # a peer gone: leave the group (and the default one) to the OS
            log.warning("torch transport: close did not meet every rank (%s); leaving its group",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return
        self.group = None
        if self.owns_group:
            _release_world()
        log.debug("torch transport closed")


# ---------------------------------------------------------------------------------------- transport
class TorchTransport:
    """Collectives over a ``torch.distributed`` process group (see the module docstring)."""

    def __init__(self, comm: Optional[Any] = None, backend: Optional[str] = None, group: Any = None,
                 timeout_s: Optional[float] = None) -> None:
        dist = _dist()
        self.backend = _check_backend(backend or default_backend())
        owns = group is None
        if owns:
            _acquire_world(comm, self.backend, _timeout(timeout_s))
            try:
                group = dist.new_group(backend=self.backend, timeout=_timeout(timeout_s))
            except BaseException:
                _release_world()
                raise
        self.group = group
        self.rank: int = int(dist.get_rank(group))
        self.size: int = int(dist.get_world_size(group))
        self.calls = 0
        self._bytes = 0
        self._res = _Resources(group, owns, self.backend)
        self._finalizer = weakref.finalize(self, self._res.close)
        gather = getattr(dist, "all_gather_single", None)   # the newer name (torch >= 2.13)
        self._gather = gather if gather is not None else dist.all_gather_into_tensor
        _transport.register(self)

    # ------------------------------------------------------------------------------ life
    @property
    def closed(self) -> bool:
        return self._res.closed

    def close(self) -> None:
        """Finish, meet the other ranks, destroy the group (module docstring); idempotent."""
        self._finalizer()

    @property
    def bytes_sent(self) -> int:
        return self._bytes

    def _count(self, tensor: torch.Tensor) -> None:
        if self._res.closed:
            raise RuntimeError("the torch transport is closed")
        self.calls += 1
        self._bytes += tensor.nbytes

    def __repr__(self) -> str:
        return f"TorchTransport(rank={self.rank}, size={self.size}, backend={self.backend!r})"

    # ------------------------------------------------------------------------------ all-reduce
    def allreduce_async_(self, tensor: torch.Tensor, average: bool = False) -> Handle:
        if average and not (tensor.is_floating_point() or tensor.is_complex()):
            raise ValueError(f"average=True needs a floating-point tensor, got {tensor.dtype}")
        self._count(tensor)
        if self.size == 1:
            return Done(tensor)
        buf = self._staged(tensor)
        work = _dist().all_reduce(buf, group=self.group, async_op=True)
        self._res.track(work)
        return _TorchHandle(work, tensor, buf, average, self.size)

    def allreduce_(self, tensor: torch.Tensor, average: bool = False) -> torch.Tensor:
        return self.allreduce_async_(tensor, average).wait()

    # ------------------------------------------------------------------------------ gather, broadcast
    def _staged(self, tensor: torch.Tensor) -> torch.Tensor:
        """Where the collective runs: ``tensor`` itself, or its contiguous copy, or, for NCCL, its
        copy on this rank's current CUDA device when it is a host tensor."""
        if self.backend == "nccl" and tensor.device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
            return tensor.to(device, memory_format=torch.contiguous_format)
        return tensor if tensor.is_contiguous() else tensor.contiguous()

    def _gather_rows(self, src: torch.Tensor) -> torch.Tensor:
        """Every rank's ``src`` (contiguous, equal shapes) concatenated along dimension 0, on
        ``src``'s device."""
        work = self._staged(src)
        out = torch.empty((self.size * src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype,
                          device=work.device)
        if self.size == 1:
            out.copy_(work)
        elif src.numel():
            self._gather(out, work, group=self.group)
        return out.to(src.device)

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        src = _rows(tensor).contiguous()
        self._count(src)
        return self._gather_rows(src)

    def allgatherv(self, tensor: torch.Tensor,
                   counts: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, List[int]]:
        src = _rows(tensor).contiguous()
        self._count(src)
        if counts is None:
            mine = torch.tensor([src.shape[0]], dtype=torch.int64, device=src.device)
            firsts = [int(c) for c in self._gather_rows(mine).tolist()]
        else:
            firsts = [int(c) for c in counts]
        longest = max(firsts)
        if all(c == longest for c in firsts):
            return self._gather_rows(src), firsts
        padded = src.new_zeros((longest,) + tuple(src.shape[1:]))
        padded[:src.shape[0]].copy_(src)
        gathered = self._gather_rows(padded)
        parts = [gathered[r * longest:r * longest + c] for r, c in enumerate(firsts)]
        return torch.cat(parts), firsts

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        self._count(tensor)
        if self.size == 1:
            return tensor
        dist = _dist()
        buf = self._staged(tensor)
        dist.broadcast(buf, src=dist.get_global_rank(self.group, root), group=self.group)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor
