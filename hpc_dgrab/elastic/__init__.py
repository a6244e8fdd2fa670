"""``hd.elastic``: Horovod's elastic API (``run``, ``TorchState``, ``ObjectState``,
``ElasticSampler``), so that a Horovod elastic script runs unchanged.

What it does here:

* ``state.commit()`` snapshots the state in memory (model and optimizer ``state_dict``, every
  other object with ``state_dict``/``load_state_dict`` such as a sampler or an LR scheduler, and
  the user's attributes, deep-copied); ``state.restore()`` puts the last snapshot back.
* With ``checkpoint_dir=`` (or the environment variable ``HPC_DGRAB_ELASTIC_DIR``) rank 0 also
  writes each commit to disk atomically, as safetensors + JSON (:mod:`hpc_dgrab.checkpoint`;
  nothing read back is unpickled), keeping the newest two.
* ``@hd.elastic.run`` on ``train(state, ...)``: loads the newest commit on disk (if any) on rank 0,
  then ``state.sync()`` broadcasts rank 0's state to every rank, then calls ``train``.

What it does not do: membership never changes while a job runs (no live rescale, no host
discovery; ``check_host_updates()`` never interrupts, reset callbacks are never called). A failed
rank ends the MPI job; a Slurm requeue (or any relaunch, with any number of ranks) restarts from
the last commit on disk. An exception in ``train`` propagates (no in-process retry).
"""
from __future__ import annotations

from hpc_dgrab.elastic.sampler import ElasticSampler
from hpc_dgrab.elastic.state import ENV_DIR, ObjectState, State, TorchState, run

__all__ = ["ENV_DIR", "ElasticSampler", "ObjectState", "State", "TorchState", "run"]
