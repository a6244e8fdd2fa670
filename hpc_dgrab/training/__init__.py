"""The training application behind ``python -m hpc_dgrab.train``.

``config`` (the settings and their one table of defaults and help), ``combinations`` (which
settings run together), ``signals`` (stopping), ``data`` and ``evaluation``, ``state`` (what a
checkpoint holds), ``loop`` (the one loop, :class:`~hpc_dgrab.training.loop.Trainer`) and
``drivers`` (one per method, behind one interface). Importing this package starts no MPI.
"""
