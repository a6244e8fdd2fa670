"""Horovod-shaped operations: all-reduce, all-gather, broadcast, alltoall, reduce-scatter, their
grouped and asynchronous forms, join/barrier, process sets and the timeline.

They run on one engine thread per process (:mod:`hpc_dgrab.ops.engine`) that matches operations
across ranks by name (:mod:`hpc_dgrab.ops.negotiation`), so ranks may submit named operations in
different orders, and every disagreement raises the same one-line error on every rank. Users call
them as ``hpc_dgrab.allreduce`` etc.; see docs/guides/horovod-ops.md.
"""
