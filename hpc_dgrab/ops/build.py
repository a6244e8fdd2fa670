"""Horovod's build and runtime queries, answered truthfully for this library.

Collectives go through MPI (mpi4py), so ``mpi_built()`` and ``mpi_enabled()`` are True. Gloo and
NCCL are reported as torch provides them (``torch.distributed``'s backends; hpc_dgrab's own
operations do not use them). CUDA-, ROCm-, DDL- and oneCCL-specific operations are not built.
"""
from __future__ import annotations


def mpi_built() -> bool:
    """True: hpc_dgrab runs on MPI."""
    return True


def mpi_enabled() -> bool:
    """True: the operations run over MPI."""
    return True


def mpi_threads_supported() -> bool:
    """True when MPI runs with ``THREAD_MULTIPLE`` (the engine's thread needs it)."""
    from mpi4py import MPI

    return bool(MPI.Query_thread() >= MPI.THREAD_MULTIPLE)


def gloo_built() -> bool:
    """True when torch provides the Gloo backend (``torch.distributed``)."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_gloo_available())


def gloo_enabled() -> bool:
    """False: hpc_dgrab's operations do not run over Gloo."""
    return False


def nccl_built() -> bool:
    """True when torch provides NCCL (``torch.distributed``)."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_nccl_available())


def cuda_built() -> bool:
    """False: no CUDA-specific operations are built (GPU tensors go through the CPU)."""
    return False


def rocm_built() -> bool:
    """False: no ROCm-specific operations are built."""
    return False


def ddl_built() -> bool:
    """False: IBM DDL is not supported."""
    return False


def ccl_built() -> bool:
    """False: oneCCL is not supported."""
    return False
