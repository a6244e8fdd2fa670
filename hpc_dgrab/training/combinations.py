"""Which ``--sync`` x ``--order`` x ``--compress`` x ``--gradalign-beta`` combinations run, and which
given flags do nothing. The training-command guide's table is :func:`combinations_markdown`; every
refusal is one line naming the flags."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from hpc_dgrab.training.config import TrainConfig

log = logging.getLogger(__name__)

SYNCS = ("allreduce", "horovod", "gossip")
ORDERS = ("rr", "grab", "pairbalance", "dgrab")
COMPRESSIONS = ("none", "topk", "regtopk")
GRADIENT_ORDERS = ("grab", "pairbalance", "dgrab")  # they balance per-example gradients of the step


def combination_problem(sync: str, order: str, compress: str, gradalign: bool) -> Optional[str]:
    """Why ``--sync`` x ``--order`` x ``--compress`` x ``--gradalign-beta`` cannot run (None: it can)."""
    if gradalign and sync == "gossip":
        return "--gradalign-beta averages models with all-reduce; it cannot run with --sync gossip"
    if compress != "none" and sync == "horovod":
        return (f"--compress {compress} sends a sparse all-gather over MPI (or compressed gossip); "
                "it needs --sync allreduce or gossip")
    if compress != "none" and gradalign:
        return f"--compress {compress} compresses gradient steps; GradAlign exchanges whole models"
    if order in GRADIENT_ORDERS and sync == "gossip":
        return (f"--order {order} balances per-example gradients inside the synchronous gradient step; "
                "gossip has no such step")
    if order in GRADIENT_ORDERS and gradalign:
        return (f"--order {order} balances per-example gradients inside the synchronous gradient step; "
                "GradAlign's local steps have no such step")
    return None


def unused_flag_problem(given: Sequence[str], cfg: TrainConfig) -> Optional[str]:
    """Why a flag the user GAVE (``given``: dest names) does nothing with ``cfg`` (None: all used)."""
    rules: List[Tuple[str, bool, str]] = [
        ("topology", cfg.sync == "gossip", "--topology is the gossip graph; it needs --sync gossip"),
        ("local_steps", cfg.gradalign_beta is not None, "--local-steps needs --gradalign-beta"),
        ("dgrab_mode", cfg.order == "dgrab", "--dgrab-mode needs --order dgrab"),
        ("dgrab_payload", cfg.order == "dgrab" and cfg.dgrab_mode == "parallel",
         "--dgrab-payload needs --order dgrab --dgrab-mode parallel"),
        ("order_units", cfg.order in GRADIENT_ORDERS,
         "--order-units needs --order grab, pairbalance or dgrab"),
        ("density", cfg.compress != "none", "--density needs --compress topk or regtopk"),
        ("mu", cfg.compress == "regtopk", "--mu needs --compress regtopk"),
        ("checkpoint_every", cfg.checkpoint_dir is not None, "--checkpoint-every needs --checkpoint-dir"),
        ("checkpoint_every", cfg.sync != "gossip",
         "--checkpoint-every would be a barrier for gossip; --sync gossip checkpoints at the end "
         "and when stopped by a signal"),
        ("resume", cfg.checkpoint_dir is not None, "--resume needs --checkpoint-dir"),
    ]
    for dest, ok, reason in rules:
        if dest in given and not ok:
            return reason
    return None


def combinations_markdown() -> str:
    """The training-command guide's table of every combination, each supported or refused with its
    one-line reason."""
    lines = ["| --sync | --order | --compress | --gradalign-beta | runs? |",
             "|---|---|---|---|---|"]
    for sync in SYNCS:
        for order in ORDERS:
            for compress in COMPRESSIONS:
                for gradalign in (False, True):
                    problem = combination_problem(sync, order, compress, gradalign)
                    lines.append(f"| {sync} | {order} | {compress} | {'BETA' if gradalign else '-'} | "
                                 f"{'yes' if problem is None else 'no: ' + problem} |")
    return "\n".join(lines) + "\n"
