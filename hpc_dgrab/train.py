"""``python -m hpc_dgrab.train``: data-parallel training under mpirun or srun.

Every rank reads only its own shard of ``--data``, trains with the chosen synchronisation, and
rank 0 prints one line per epoch and writes one JSON line per epoch to ``--metrics``. This module
holds only the command line (flags, ``--config FILE.toml``, the checks that need no MPI); the flags
and their defaults are :class:`hpc_dgrab.training.config.TrainConfig`, the loop is
:class:`hpc_dgrab.training.loop.Trainer`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Dict, List, Optional, Sequence

from hpc_dgrab import runtime
from hpc_dgrab.cli import ArgumentParser, UserError, run_main, setup_logging
from hpc_dgrab.errors import EXIT_PREEMPTED
from hpc_dgrab.training import config
from hpc_dgrab.training.combinations import combination_problem, unused_flag_problem
from hpc_dgrab.training.config import TrainConfig
from hpc_dgrab.training.signals import STOP, Preempted

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

def build_parser() -> ArgumentParser:
    """The trainer's command line, built from :class:`TrainConfig`'s table of flags."""
    p = ArgumentParser(prog="python -m hpc_dgrab.train", description=__doc__.split("\n\n")[0],
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE.toml",
                   help="read flags from a TOML file (see below) (default: none)")
    groups = {name: p.add_argument_group(name) for name in config.groups()}
    for spec in config.flags():
        flag, g = spec.flag, groups[spec.flag.group]
        if isinstance(spec.default, bool):
            g.add_argument(spec.option, action="store_true", help=spec.help_line)
            continue
        kw: Dict[str, Any] = {"help": spec.help_line, "metavar": flag.metavar}
        if flag.type is not None:
            kw["type"] = flag.type
        if flag.choices is not None:
            kw["choices"] = list(flag.choices)
        if flag.required:
            kw["required"] = True
        else:
            kw["default"] = None if flag.tracked else spec.default
        g.add_argument(spec.option, **kw)
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
            raise UserError(f"--config: {path}: unknown key {key!r} (keys are the flags without --, "
                            "e.g. batch-size)")
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
    cfg = TrainConfig(**config.fill_defaults({k: v for k, v in vars(args).items() if k != "config"}))
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
    from hpc_dgrab.training.loop import Trainer  # imports MPI: after the checks above

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
