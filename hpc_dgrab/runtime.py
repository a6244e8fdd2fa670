"""Who am I: rank, size, local rank, node, device.

This is the one module of hpc_dgrab that reads environment variables. Everything else asks it
through named properties (the Lightning ClusterEnvironment / submitit model). Ranks and sizes
always come from MPI itself: under ``mpirun`` inside an ``sbatch`` allocation SLURM_PROCID is 0
on every rank, so the Slurm variables are reported, never trusted for identity.

MPI is initialised lazily (on the first call of :func:`get_runtime` or :func:`world`), so that
modules which know no MPI (topology, data, the numerics) import without it.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)

#: Environment variables that name a rank before MPI is initialised, in order of trust.
_LAUNCHER_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def env(name: str, default: Optional[str] = None) -> Optional[str]:
    """Read one environment variable (the single accessor the rest of the package uses)."""
    return os.environ.get(name, default)


def env_flag(name: str) -> bool:
    """True when the variable is set to a true-looking value (1, true, yes, on)."""
    return (env(name) or "").strip().lower() in ("1", "true", "yes", "on")


def child_env(pythonpath: Optional[str] = None, single_thread: bool = True) -> dict:
    """Environment for a child process this package launches (a trainer run of a benchmark):
    this one, with ``pythonpath`` put first on PYTHONPATH and, by default, one BLAS/OpenMP thread."""
    out = dict(os.environ)
    if pythonpath:
        out["PYTHONPATH"] = pythonpath + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    if single_thread:
        out.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return out


def launcher_rank() -> int:
    """This process's rank as the launcher tells it, without initialising MPI (0 when unknown).

    Use only for deciding who prints before MPI is up; identity comes from :func:`get_runtime`.
    """
    for var in _LAUNCHER_RANK_VARS:
        value = env(var)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def launched_by_mpi() -> bool:
    """True when an MPI launcher (mpirun/srun with PMI) started this process."""
    return any(env(v) is not None for v in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"))


@dataclass(frozen=True)
class SlurmInfo:
    """Facts of the Slurm job this process runs in (reported, not used for identity)."""

    job_id: str
    procid: Optional[int]
    localid: Optional[int]
    nodeid: Optional[int]
    ntasks: Optional[int]
    nodelist: Optional[str]
    cpus_per_task: Optional[int]
    partition: Optional[str]
    job_name: Optional[str] = None
    #: how often this job was requeued (0 on its first run)
    restart_count: int = 0
    array_job_id: Optional[str] = None
    array_task_id: Optional[int] = None

    @staticmethod
    def from_env() -> Optional[SlurmInfo]:
        job = env("SLURM_JOB_ID") or env("SLURM_JOBID")
        if not job:
            return None

        def num(name: str) -> Optional[int]:
            value = env(name)
            return int(value) if value and value.isdigit() else None

        return SlurmInfo(job_id=job, procid=num("SLURM_PROCID"), localid=num("SLURM_LOCALID"),
                         nodeid=num("SLURM_NODEID"), ntasks=num("SLURM_NTASKS"),
                         nodelist=env("SLURM_JOB_NODELIST"), cpus_per_task=num("SLURM_CPUS_PER_TASK"),
                         partition=env("SLURM_JOB_PARTITION"), job_name=env("SLURM_JOB_NAME"),
                         restart_count=num("SLURM_RESTART_COUNT") or 0,
                         array_job_id=env("SLURM_ARRAY_JOB_ID"), array_task_id=num("SLURM_ARRAY_TASK_ID"))


@dataclass(frozen=True)
class Runtime:
    """Identity of this process in the job. Build it with :func:`get_runtime`."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    node_rank: int
    num_nodes: int
    hostname: str
    device: str
    threads: int
    launcher: str
    slurm: Optional[SlurmInfo]
    cuda_aware_mpi: bool

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict:
        return asdict(self)


_RUNTIME: Optional[Runtime] = None


def world() -> Any:
    """``MPI.COMM_WORLD`` (initialises MPI on first use)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def mpi_initialized() -> bool:
    """True when MPI is already initialised in this process (without initialising it)."""
    import sys

    if "mpi4py.MPI" not in sys.modules:
        return False
    return bool(sys.modules["mpi4py.MPI"].Is_initialized())


def _launcher() -> str:
    if env("OMPI_COMM_WORLD_SIZE") is not None:
        return "mpirun"
    if env("SLURM_STEP_ID") is not None and env("PMIX_RANK") is not None:
        return "srun"
    if env("PMI_SIZE") is not None or env("PMIX_RANK") is not None:
        return "pmi"
    return "single"


def _cpu_threads(local_size: int) -> int:
    """Threads for torch so that the ranks of one node share its cores without oversubscribing."""
    explicit = env("OMP_NUM_THREADS") or env("SLURM_CPUS_PER_TASK")
    if explicit and explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    total = os.cpu_count() or allowed
    if allowed < total:  # the launcher bound us to a subset of cores: use exactly those
        return max(1, allowed)
    return max(1, allowed // max(1, local_size))


def _cuda_aware(mpi: Any) -> bool:
    query = getattr(mpi, "Query_cuda_support", None)
    if query is None:
        return False
    try:
        return bool(query())
    except Exception:  # pragma: no cover - depends on the MPI build
        return False


def get_runtime(set_threads: bool = True) -> Runtime:
    """Initialise MPI (once), work out this process's place in the job, and return it.

    Local rank and ranks per node come from a shared-memory split of COMM_WORLD; the node rank
    from the order of the nodes' lowest world ranks. With ``set_threads`` torch's intra-op threads
    are set to :attr:`Runtime.threads`.
    """
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    leaders = comm.Split(0 if local.rank == 0 else MPI.UNDEFINED, key=comm.rank)
    node_rank = leaders.rank if local.rank == 0 else -1
    num_nodes = leaders.size if local.rank == 0 else -1
    if leaders != MPI.COMM_NULL:
        leaders.Free()
    node_rank, num_nodes = local.bcast((node_rank, num_nodes), root=0)
    local_rank, local_size = local.rank, local.size
    local.Free()

    threads = _cpu_threads(local_size)
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
        if set_threads:
            torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass

    _RUNTIME = Runtime(rank=comm.rank, size=comm.size, local_rank=local_rank, local_size=local_size,
                       node_rank=node_rank, num_nodes=num_nodes, hostname=socket.gethostname(),
                       device=device, threads=threads, launcher=_launcher(),
                       slurm=SlurmInfo.from_env(), cuda_aware_mpi=_cuda_aware(MPI))
    log.debug("runtime: %s", _RUNTIME)
    return _RUNTIME
