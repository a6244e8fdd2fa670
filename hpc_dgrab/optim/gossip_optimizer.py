"""``GossipOptimizer``: decentralized asynchronous SGD (DASGD over push-sum gossip) in the user's loop.

::

    opt = hd.GossipOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, topology="exponential")
    for x, y in loader:                      # ranks may run different numbers of steps
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    stats = opt.finish()                     # collective: serve until all ranks are done, then drain
    opt.average_model()                      # collective: model <- network average (one all-reduce)

``step()`` is the local optimizer step, then a non-blocking push of this rank's push-sum share to
its out-neighbours in ``topology`` (any name of :meth:`hpc_dgrab.comm.topology.Topology.from_name`:
ring, torus, hypercube, exponential, one-peer-exponential, erdos-renyi:P, ...) and a merge of
whatever has arrived; it never waits for another rank. The model then holds this rank's de-biased
estimate ``z / w``. Like :func:`DistributedOptimizer` it returns a subclass of the user's optimizer
class that shares its state. The DASGD object itself (:class:`hpc_dgrab.optim.dasgd.DASGD`) is in
``opt.dasgd``; ``opt.stats()`` has the staleness of merged shares (``merged_staleness_avg``/``_max``)
and the traffic (``bytes_sent``, ``messages_sent``, ...). ``staleness_avg``, ``staleness_max``,
``bytes_sent``, ``steps``, ``weight`` and ``comm_s`` are properties; ``take_staleness_window()``
gives the staleness since its last call; ``gossip_state_dict()`` / ``load_gossip_state_dict()`` save
and restore the push-sum state (``state_dict()`` stays the wrapped optimizer's). CPU tensors of one
floating dtype.

Compressed gossip: ``GossipOptimizer(opt, model, compression=hd.TopK(0.01), gamma=None)`` runs
CHOCO-SGD instead (:mod:`hpc_dgrab.optim.choco_gossip`): each push carries a Top-k / RegTop-k
selection of the difference between the model and its public copy (k indices + k values instead
of the whole model); ``gamma`` (consensus step, in (0, 1]) defaults to ``min(1, 2 * density)``
(:func:`hpc_dgrab.comm.choco.default_gamma`). It needs a static graph with a doubly stochastic
mixing matrix (any undirected graph; ``exponential``) and float32/float64
parameters. Not push-sum: ``weight`` is 1, and ``gossip_state_dict()`` holds the public copies.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Union, cast

import torch
from torch import nn

from hpc_dgrab import api
from hpc_dgrab.errors import UserError
from hpc_dgrab.optim.distributed import subclass_instance
from hpc_dgrab.tensors import flat_params, set_flat_params

if TYPE_CHECKING:
    from hpc_dgrab.compress.base import Compressor
    from hpc_dgrab.optim.choco_gossip import CompressedGossip
    from hpc_dgrab.optim.dasgd import DASGD, StalenessMeter

log = logging.getLogger(__name__)


class _GossipMixin:
    dasgd: Union[DASGD, CompressedGossip]

    def _gossip_setup(self, model: nn.Module, topology: str, max_in_flight: int, seed: int,
                      compression: Optional[Compressor] = None, gamma: Optional[float] = None) -> None:
        from hpc_dgrab.comm.choco import default_gamma, message_numel, mixing_weights
        from hpc_dgrab.comm.collectives import allreduce_
        from hpc_dgrab.comm.gossip import GossipEngine
        from hpc_dgrab.comm.topology import Topology
        from hpc_dgrab.optim.choco_gossip import CompressedGossip
        from hpc_dgrab.optim.dasgd import DASGD

        ctx = api.context("GossipOptimizer(...)")
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        api.check_same_everywhere([api._describe(n, p) for n, p in trainable],
                                  "GossipOptimizer: the trainable parameters", ctx.comm)
        api.check_same_everywhere([("compression", (), repr(compression)), ("gamma", (), repr(gamma))],
                                  "GossipOptimizer: compression and gamma", ctx.comm)
        try:
            topo = Topology.from_name(topology, ctx.size, seed=seed)
            x = flat_params(model)
            numel = x.numel()
            if compression is not None:
                if x.dtype not in (torch.float32, torch.float64):
                    raise ValueError(f"compressed gossip needs float32 or float64 parameters, not {x.dtype}")
                mixing_weights(topo, ctx.rank)          # refuses graphs it cannot mix on
                if gamma is None:
                    gamma = default_gamma(compression.k_for(numel) / numel)
                if not 0.0 < float(gamma) <= 1.0:
                    raise ValueError(f"gamma must be in (0, 1], got {gamma}")
                numel = message_numel(compression.k_for(numel))
            elif gamma is not None:
                raise ValueError("gamma is the consensus step of compressed gossip; it needs compression=")
            engine = GossipEngine(topo, numel, dtype=x.dtype, comm=ctx.comm, max_in_flight=max_in_flight)
        except ValueError as exc:
            raise UserError(f"GossipOptimizer: {exc}", collective=True) from None
        opt = cast(torch.optim.Optimizer, self)
        if compression is not None:
            assert gamma is not None
            self.dasgd = CompressedGossip(model, opt, engine, compression, float(gamma))
        else:   # no loss_fn: the user's loop computes the loss
            self.dasgd = DASGD(model, opt, None, engine)
        self._gossip_allreduce = lambda buf: allreduce_(buf, comm=ctx.comm)
        self.topology = topo

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One DASGD iteration: the local optimizer step (``closure`` as in torch), then push this
        rank's share and merge what has arrived (never waits)."""
        d = self.dasgd
        if d.finished:
            raise UserError("GossipOptimizer.step() after finish()")
        local_step = super().step  # type: ignore[misc]  # the user's optimizer class, mixed in
        return d.iterate(lambda: local_step(closure))

    def finish(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Collective: keep serving neighbours until every rank has called it, then drain all messages
        in flight (the push-sum mass is then exact). Returns :meth:`stats`."""
        return self.dasgd.finish(timeout=timeout)

    def average_model(self) -> None:
        """Collective (after :meth:`finish`): set the model to the network average ``sum z / sum w``."""
        set_flat_params(self.dasgd.model, self.dasgd.average(self._gossip_allreduce))

    def stats(self) -> Dict[str, Any]:
        """Gossip traffic and staleness counters (see the module docstring)."""
        return self.dasgd.stats()

    def is_finite(self) -> bool:
        """Whether this rank's push-sum state holds only finite numbers."""
        return self.dasgd.is_finite()

    def take_staleness_window(self) -> StalenessMeter:
        """Staleness of the shares merged since the previous call (and start a new window)."""
        return self.dasgd.take_window()

    def gossip_state_dict(self) -> Dict[str, Any]:
        """The push-sum state (:meth:`DASGD.state_dict`); ``state_dict()`` stays the optimizer's own."""
        return self.dasgd.state_dict()

    def load_gossip_state_dict(self, state: Dict[str, Any]) -> None:
        self.dasgd.load_state_dict(state)

    @property
    def steps(self) -> int:
        """Iterations taken by this rank."""
        return self.dasgd.steps

    @property
    def weight(self) -> float:
        """This rank's push-sum weight (1 with compression)."""
        return float(self.dasgd.weight)

    @property
    def comm_s(self) -> float:
        """Seconds spent pushing and merging."""
        return self.dasgd.comm_s

    @property
    def finished(self) -> bool:
        return self.dasgd.finished

    @property
    def staleness_avg(self) -> float:
        return self.dasgd.staleness.avg

    @property
    def staleness_max(self) -> int:
        return self.dasgd.staleness.max

    @property
    def bytes_sent(self) -> int:
        return int(self.dasgd.engine.bytes_sent)


def GossipOptimizer(optimizer: torch.optim.Optimizer, model: nn.Module, topology: str = "exponential",
                    max_in_flight: int = 2, seed: int = 0, compression: Optional[Compressor] = None,
                    gamma: Optional[float] = None) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` (over ``model``'s parameters) for DASGD on ``topology`` (see the module doc);
    with ``compression`` (``hd.TopK(d)`` / ``hd.RegTopK(d)``), compressed CHOCO gossip with consensus
    step ``gamma`` (default ``min(1, 2 * density)``). Collective: every rank calls it with the same
    model layout and arguments."""
    api.context("GossipOptimizer(...)")
    obj = subclass_instance(optimizer, _GossipMixin)
    obj._gossip_setup(model, topology, max_in_flight, seed, compression, gamma)
    return obj
