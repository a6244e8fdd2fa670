"""hpc_dgrab: MPI data-parallel training with gossip DASGD, sparse RegTop-k all-gather,
D-GraB example ordering and GradAlign, on HDF5-sharded data.

Importing the package initialises nothing (no MPI, no torch threads); see :mod:`hpc_dgrab.runtime`.
"""
__version__ = "0.1.0"
