"""``python -m hpc_dgrab.train``: data-parallel training under mpirun or srun.

Every rank reads only its own shard of ``--data``, trains with the chosen synchronisation, and
rank 0 prints one line per epoch and writes one JSON line per epoch to ``--metrics``. This module
holds only the command line (flags, ``--config FILE.toml``, the checks that need no MPI); the loop
is :class:`hpc_dgrab.trainer.Trainer`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Dict, List, Optional, Sequence

from hpc_dgrab import runtime
from hpc_dgrab.cli import (ArgumentParser, UserError, nonneg_float, positive_float, positive_int, run_main,
                           setup_logging)
from hpc_dgrab.errors import EXIT_PREEMPTED
from hpc_dgrab.trainer import (COMPRESSIONS, ORDERS, STOP, SYNCS, Preempted, Trainer, TrainConfig,
                               combination_problem, unused_flag_problem)

log = logging.getLogger("hpc_dgrab.train")

EPILOG = f"""\
examples:
  launch/local -n 4 -- python -m hpc_dgrab.train --data runs/data/fmnist --model cnn --epochs 5
  srun python -m hpc_dgrab.train --config job.toml --checkpoint-dir ckpt --resume

--data is a shard directory written by `python -m hpc_dgrab.data shard` (its shard count must equal
the number of ranks or be a multiple of it), or a built-in source name (digits, fashion-mnist, ...),
which rank 0 shards once into --data-cache.

--config FILE.toml sets any flag: its keys are the flags without the leading --, e.g.
  model = "mlp"
  batch-size = 32
  resume = true
A flag given on the command line wins over the file. A flag that does nothing in the chosen mode
(e.g. --topology without --sync gossip) is refused.

Stopping: SIGTERM or SIGUSR1 stop every rank at the next step boundary, write a checkpoint of the
running epoch into --checkpoint-dir and exit {EXIT_PREEMPTED}; run the same command with --resume to
continue exactly where it stopped. --resume with no checkpoint in the directory starts from scratch.

exit codes: 0 done; 1 internal error; 2 bad input, or a non-finite loss (one line `error: ...`);
{EXIT_PREEMPTED} stopped by SIGTERM/SIGUSR1 after writing a checkpoint (continue with --resume);
130 interrupted (SIGINT, or a signal without --checkpoint-dir: nothing saved).
"""

#: flags whose default is resolved after parsing, so that "given by the user" can be told apart
TRACKED_DEFAULTS: Dict[str, Any] = {"topology": "ring", "dgrab_mode": "parallel", "dgrab_payload": "full",
                                    "order_units": "example",
                                    "density": 0.01, "mu": 4.0, "local_steps": 1, "checkpoint_every": 1}


def build_parser() -> ArgumentParser:
    """The trainer's command line (the contract in the README)."""
    p = ArgumentParser(prog="python -m hpc_dgrab.train", description=__doc__.split("\n\n")[0],
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE.toml", help="read flags from a TOML file (see below)")
    g = p.add_argument_group("data and model")
    g.add_argument("--data", required=True, help="shard directory, or a built-in source name to shard on first use")
    g.add_argument("--data-cache", default="runs/data", help="where built-in sources are sharded (default: %(default)s)")
    g.add_argument("--partition", default="iid", help="partition when sharding a built-in source (default: %(default)s)")
    g.add_argument("--model", default="cnn", help="logreg, mlp, cnn, cnn-bn (default: %(default)s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=5, help="passes over each rank's shard (default: %(default)s)")
    g.add_argument("--lr", type=positive_float, default=0.05, help="learning rate (default: %(default)s)")
    g.add_argument("--momentum", type=nonneg_float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="L2 weight decay (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="examples per rank per step (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model init and the orders (default: %(default)s)")
    g = p.add_argument_group("distribution")
    g.add_argument("--sync", default="allreduce", choices=list(SYNCS),
                   help="allreduce: synchronous SGD over MPI; horovod: the same over Horovod; "
                        "gossip: decentralized asynchronous SGD (default: %(default)s)")
    g.add_argument("--topology", default=None, help="gossip graph, e.g. ring, exponential (default: ring)")
    g.add_argument("--order", default="rr", choices=list(ORDERS), help="example order (default: %(default)s)")
    g.add_argument("--dgrab-mode", default=None, choices=["parallel", "exact"],
                   help="D-GraB coordination (default: parallel)")
    g.add_argument("--dgrab-payload", default=None, choices=["full", "half"],
                   help="D-GraB parallel order data per step: the whole signed sum (d floats) or half of it, "
                        "the other half sent the next step (default: full)")
    g.add_argument("--order-units", default=None, metavar="example|microbatch:K",
                   help="balancing units of grab/pairbalance/dgrab: per-example gradients, or mean gradients "
                        "of K consecutive examples (needed for BatchNorm/Dropout models) (default: example)")
    g.add_argument("--compress", default="none", choices=list(COMPRESSIONS),
                   help="gradient sparsification with error feedback (default: %(default)s)")
    g.add_argument("--density", type=positive_float, default=None,
                   help="fraction of entries sent by topk/regtopk (default: 0.01)")
    g.add_argument("--mu", type=positive_float, default=None, help="RegTop-k regularisation (default: 4.0)")
    g.add_argument("--gradalign-beta", type=nonneg_float, default=None, help="enable GradAlign with this beta")
    g.add_argument("--local-steps", type=positive_int, default=None,
                   help="GradAlign/local SGD steps per round (default: 1)")
    g.add_argument("--straggler", default=None, metavar="RANK:FACTOR[:sleep|spin]",
                   help="make RANK's steps FACTOR times slower (an experiment switch)")
    g = p.add_argument_group("output")
    g.add_argument("--metrics", default=None, metavar="FILE.jsonl", help="one JSON line per epoch (rank 0 writes)")
    g.add_argument("--checkpoint-dir", default=None, help="per-rank checkpoints (one job at a time per directory)")
    g.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="checkpoint after every N epochs, and always at the end (default: 1)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir (none there: start fresh)")
    g.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bar on rank 0 (auto: when stderr is a terminal; log lines otherwise)")
    g.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    return p


def _config_argv(path: str, parser: argparse.ArgumentParser) -> List[str]:
    """The flags a TOML file sets, as command-line tokens (so they are checked like typed flags)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except OSError as exc:
        raise UserError(f"--config: {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config: {path}: not valid TOML ({exc})") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    out: List[str] = []
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in actions or dest in ("config", "help"):
            raise UserError(f"--config: {path}: unknown key {key!r} (keys are the flags without --, e.g. batch-size)")
        action = actions[dest]
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UserError(f"--config: {path}: {key} must be true or false, got {value!r}")
            out += [flag] if value else []
        elif isinstance(value, (dict, list)) or isinstance(value, bool):
            raise UserError(f"--config: {path}: {key} must be a string or a number, got {value!r}")
        else:
            out += [flag, str(value)]
    return out


def _given(argv: Sequence[str], parser: argparse.ArgumentParser) -> List[str]:
    """Dest names of the flags present in ``argv`` (``--flag`` or ``--flag=value``)."""
    by_flag = {opt: a.dest for a in parser._actions for opt in a.option_strings}
    out = []
    for tok in argv:
        if tok.startswith("--"):
            dest = by_flag.get(tok.split("=", 1)[0])
            if dest is not None:
                out.append(dest)
    return out


def parse_args(argv: Optional[Sequence[str]]) -> TrainConfig:
    """Parse and check everything that can be checked before MPI starts (the same on every rank)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    full = (_config_argv(known.config, parser) if known.config else []) + argv
    args = parser.parse_args(full)
    given = _given(full, parser)
    for dest, default in TRACKED_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    values = {k: v for k, v in vars(args).items() if k != "config"}
    cfg = TrainConfig(**values)
    from hpc_dgrab.models import MODELS

    if cfg.model not in MODELS:
        raise UserError(f"--model: unknown model {cfg.model!r}; choose from {', '.join(MODELS)}")
    if cfg.density > 1:
        raise UserError(f"--density must be in (0, 1], got {cfg.density}")
    problem = combination_problem(cfg.sync, cfg.order, cfg.compress, cfg.gradalign_beta is not None)
    problem = problem or unused_flag_problem(given + (["resume"] if cfg.resume else []), cfg)
    if problem:
        raise UserError(problem)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    STOP.install()  # before anything slow: a SIGTERM from now on stops at a step boundary
    cfg = parse_args(argv)
    setup_logging(cfg.debug)
    rt = runtime.get_runtime()
    if rt.rank == 0:
        log.info("%d ranks on %d node(s), device %s, %d torch threads per rank, sync %s",
                 rt.size, rt.num_nodes, rt.device, rt.threads, cfg.sync)
    try:
        Trainer(cfg).run()
    except Preempted as stop:
        if rt.rank == 0:
            sys.stderr.write(stop.line + "\n")
            sys.stderr.flush()
        return stop.code
    return 0


def cli() -> None:
    """Console-script entry point: :func:`main` under the one-line error contract."""
    run_main(main)


if __name__ == "__main__":
    cli()
