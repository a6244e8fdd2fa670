"""Communication layer: topologies (pure numpy), collectives, gossip, sparse all-gather.

Imports only :mod:`hpc_dgrab.runtime`; knows no method and no trainer.
"""
