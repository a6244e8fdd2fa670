"""The training job's settings: :class:`TrainConfig`, the one table of every flag's default and help.

Each field of :class:`TrainConfig` is one flag of ``python -m hpc_dgrab.train`` (``--batch-size`` is
``batch_size``); its metadata (:class:`Flag`) holds the help line, the argparse type, choices,
metavar and group. The command line is built from this table only. A *tracked* flag is parsed with
default ``None``, so that "given by the user" can be told apart from "left at its default"; the
default is filled in afterwards (:func:`fill_defaults`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from hpc_dgrab.cli import nonneg_float, positive_float, positive_int
from hpc_dgrab.training.combinations import COMPRESSIONS, GRADIENT_ORDERS, ORDERS, SYNCS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one :class:`TrainConfig` field appears on the command line."""

    help: str
    group: str
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[Sequence[str]] = None
    metavar: Optional[str] = None
    tracked: bool = False         # parsed as None; the default is filled in after parsing
    required: bool = False


def _f(default: Any, help: str, group: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"flag": Flag(help, group, **kw)})


DATA, OPT, DIST, OUT = "data and model", "optimisation", "distribution", "output"


@dataclasses.dataclass
class TrainConfig:
    """Everything a training job needs (the trainer's flags, defaults resolved)."""

    data: str = dataclasses.field(metadata={"flag": Flag(
        "shard directory, or a built-in source name to shard on first use", DATA, required=True)})
    data_cache: str = _f("runs/data", "where built-in sources are sharded", DATA)
    partition: str = _f("iid", "partition when sharding a built-in source", DATA)
    model: str = _f("cnn", "logreg, mlp, mlp-wide, cnn, cnn-bn", DATA)
    epochs: int = _f(5, "passes over each rank's shard", OPT, type=positive_int)
    lr: float = _f(0.05, "learning rate", OPT, type=positive_float)
    momentum: float = _f(0.9, "SGD momentum", OPT, type=nonneg_float)
    weight_decay: float = _f(0.0, "L2 weight decay", OPT, type=nonneg_float)
    batch_size: int = _f(32, "examples per rank per step", OPT, type=positive_int)
    seed: int = _f(0, "seed of the model init and the orders", OPT, type=int)
    sync: str = _f("allreduce", "allreduce: synchronous SGD over MPI; horovod: the same over Horovod; "
                   "gossip: decentralized asynchronous SGD", DIST, choices=SYNCS)
    topology: str = _f("ring", "gossip graph, e.g. ring, exponential", DIST, tracked=True)
    order: str = _f("rr", "example order", DIST, choices=ORDERS)
    dgrab_mode: str = _f("parallel", "D-GraB coordination", DIST, choices=("parallel", "exact"), tracked=True)
    dgrab_payload: str = _f("full", "D-GraB parallel order data per step: the whole signed sum (d floats) "
                            "or half of it, the other half sent the next step", DIST,
                            choices=("full", "half"), tracked=True)
    order_units: str = _f("example", "balancing units of grab/pairbalance/dgrab: per-example gradients, or "
                          "mean gradients of K consecutive examples (needed for BatchNorm/Dropout models)",
                          DIST, metavar="example|microbatch:K", tracked=True)
    compress: str = _f("none", "gradient sparsification with error feedback", DIST, choices=COMPRESSIONS)
    density: float = _f(0.01, "fraction of entries sent by topk/regtopk", DIST, type=positive_float,
                        tracked=True)
    mu: float = _f(4.0, "RegTop-k regularisation", DIST, type=positive_float, tracked=True)
    gradalign_beta: Optional[float] = _f(None, "enable GradAlign with this beta", DIST, type=nonneg_float)
    local_steps: int = _f(1, "GradAlign/local SGD steps per round", DIST, type=positive_int, tracked=True)
    straggler: Optional[str] = _f(None, "make RANK's steps FACTOR times slower (an experiment switch)", DIST,
                                  metavar="RANK:FACTOR[:sleep|spin]")
    metrics: Optional[str] = _f(None, "one JSON line per epoch (rank 0 writes)", OUT, metavar="FILE.jsonl")
    checkpoint_dir: Optional[str] = _f(None, "per-rank checkpoints (one job at a time per directory)", OUT)
    checkpoint_every: int = _f(1, "checkpoint after every N epochs, and always at the end", OUT,
                               type=positive_int, metavar="N", tracked=True)
    resume: bool = _f(False, "continue from the latest checkpoint in --checkpoint-dir "
                      "(none there: start fresh)", OUT)
    progress: str = _f("auto", "progress bar on rank 0 (auto: when stderr is a terminal; log lines "
                       "otherwise)", OUT, choices=("auto", "on", "off"))
    debug: bool = _f(False, "debug logging and full tracebacks", OUT)

    def resume_settings(self, world_size: int) -> Dict[str, Any]:
        """The settings stored in a checkpoint's meta and compared on ``--resume``."""
        out: Dict[str, Any] = {"ranks": world_size}
        for key in RESUME_KEYS:
            out[key] = getattr(self, key)
        if self.sync != "gossip":
            out.pop("topology")
        if self.order != "dgrab":
            out.pop("dgrab_mode")
        if self.order != "dgrab" or self.dgrab_payload == "full":   # checkpoints from before the flag
            out.pop("dgrab_payload")
        if self.order not in GRADIENT_ORDERS:
            out.pop("order_units")
        if self.compress == "none":
            out.pop("density")
        if self.compress != "regtopk":
            out.pop("mu")
        if self.gradalign_beta is None:
            out.pop("local_steps")
        return out

    def label(self, world_size: int) -> Dict[str, Any]:
        """The run's settings in every metrics record (the plot labels runs by what differs)."""
        return {**self.resume_settings(world_size), "lr": self.lr}


#: settings a checkpoint must have been written with to be resumed (TrainConfig fields)
RESUME_KEYS = ("model", "sync", "topology", "order", "dgrab_mode", "dgrab_payload", "order_units",
               "compress", "density", "mu", "gradalign_beta", "local_steps", "batch_size")
#: what a setting left out of a checkpoint's settings (see ``resume_settings``) stood for
RESUME_DEFAULTS = {"dgrab_payload": "full"}


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """One row of the flag table: the field, its default and its :class:`Flag`."""

    dest: str
    default: Any
    flag: Flag

    @property
    def option(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def help_line(self) -> str:
        """The help text with its default (``--help`` shows every default)."""
        if self.flag.required:
            return self.flag.help + " (required)"
        d = self.default
        shown = "none" if d is None else "on" if d is True else "off" if d is False else d
        return f"{self.flag.help} (default: {shown})"


def flags() -> Iterator[FlagSpec]:
    """Every flag, in the order of :class:`TrainConfig`'s fields."""
    for field in dataclasses.fields(TrainConfig):
        default = None if field.default is dataclasses.MISSING else field.default
        yield FlagSpec(field.name, default, field.metadata["flag"])


def groups() -> List[str]:
    """The help's flag groups, in order."""
    out: List[str] = []
    for spec in flags():
        if spec.flag.group not in out:
            out.append(spec.flag.group)
    return out


def fill_defaults(values: Dict[str, Any]) -> Dict[str, Any]:
    """``values`` (parsed flags) with each tracked flag left at ``None`` set to its default."""
    out = dict(values)
    for spec in flags():
        if spec.flag.tracked and out.get(spec.dest) is None:
            out[spec.dest] = spec.default
    return out
