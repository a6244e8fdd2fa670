"""Communication layer: topologies (pure numpy), collectives, gossip, sparse all-gather.

Imports only :mod:`hpc_dgrab.runtime`; knows no method and no trainer. Submodules are imported
explicitly (nothing here imports MPI, torch or Horovod):

* :mod:`hpc_dgrab.comm.topology` — ``Topology.from_name(name, n, seed)``, ``from_edges``, neighbours,
  mixing matrices, spectral gap (no MPI).
* :mod:`hpc_dgrab.comm.collectives` — ``allreduce_`` / ``allreduce`` / ``allreduce_async_`` +
  ``synchronize`` / ``poll``, ``allgather``, ``allgatherv``, ``broadcast_``; ``get_backend("mpi" |
  "horovod")``.
* :mod:`hpc_dgrab.comm.sparse` — ``sparse_allgather(indices, values, extra=None, ...) -> Gathered``.
* :mod:`hpc_dgrab.comm.gossip` — ``GossipEngine`` (push / poll / close), ``PushSum``,
  ``MetropolisMixer``.
* ``python -m hpc_dgrab.comm.selftest`` — asynchronous gossip stress check under mpirun.
"""
