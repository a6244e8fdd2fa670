"""``python -m hpc_dgrab.data {shard,inspect}``: write HDF5 shards of a data set, or show them."""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np

from hpc_dgrab.cli import ArgumentParser, UserError, positive_int, run_main, setup_logging
from hpc_dgrab.data.partition import PartitionError, parse_partition
from hpc_dgrab.data.shards import (
    COMPRESSIONS,
    DEFAULT_VAL_FRACTION,
    ShardError,
    check_files,
    make_shards,
    read_manifest,
    verify_contents,
    verify_files,
)
from hpc_dgrab.data.sources import BUILTIN, SourceError

log = logging.getLogger(__name__)

SHARD_EPILOG = f"""\
validation split: a source with an official test split (fashion-mnist) uses that test set as the
validation file, unless --val-fraction is given, which then holds out that share of the training
examples instead. Every other source holds out --val-fraction (default {DEFAULT_VAL_FRACTION:g}) of its
examples, class-stratified and seeded by --seed, before partitioning the rest into shards.

partitions: iid (seeded random, equal sizes), by-class (contiguous class blocks: every shard holds
only its own classes), dirichlet:ALPHA (per-class Dirichlet(ALPHA) proportions, seeded; small ALPHA
is very skewed). The output directory is written atomically: it appears complete or not at all.
"""


def _partition(text: str) -> str:
    try:
        return str(parse_partition(text))
    except PartitionError as exc:
        raise UserError(str(exc)) from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--val-fraction: expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise UserError(f"--val-fraction: must be in (0, 1), got {text}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"--seed: expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise UserError(f"--seed: must be >= 0, got {value}")
    return value


class _RawEpilog(argparse.RawDescriptionHelpFormatter):
    """Keep the epilog's line breaks."""


def build_parser() -> ArgumentParser:
    """The ``python -m hpc_dgrab.data`` argument parser."""
    parser = ArgumentParser(prog="python -m hpc_dgrab.data",
                            description="Write a data set as HDF5 shards (one per rank), or inspect them.")
    parser.add_argument("--debug", action="store_true", help="full tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="{shard,inspect}")
    sub.required = True
    shard = sub.add_parser("shard", help="write SOURCE as N HDF5 shards plus a validation file",
                           epilog=SHARD_EPILOG, formatter_class=_RawEpilog)
    shard.add_argument("source", metavar="SOURCE",
                       help=f"a built-in data set ({', '.join(BUILTIN)}) or a .npz with arrays x and y")
    shard.add_argument("--out", required=True, metavar="DIR", help="output directory (created atomically)")
    shard.add_argument("--shards", required=True, type=positive_int, metavar="N", help="number of shards")
    shard.add_argument("--partition", default="iid", type=_partition,
                       metavar="iid|by-class|dirichlet:ALPHA", help="how examples go to shards (default iid)")
    shard.add_argument("--seed", type=_nonneg_int, default=0, metavar="S",
                       help="seed of the partition and the validation holdout (default 0)")
    shard.add_argument("--val-fraction", type=_fraction, default=None, metavar="F",
                       help="held-out validation share in (0, 1); see the rule below")
    shard.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                       help="HDF5 compression of the shard files (default gzip)")
    shard.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    inspect = sub.add_parser("inspect", help="print a shard directory's manifest as a table")
    inspect.add_argument("dir", metavar="DIR", help="a directory written by the shard command")
    inspect.add_argument("--verify", action="store_true",
                         help="also check the sha256 of every file (existence and size are always checked)")
    inspect.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that a killed writer cleans up its temporary files."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_shard(args: Any) -> int:
    """Run ``shard``: write the shard directory and print a summary."""
    with _sigterm_as_interrupt():
        manifest = make_shards(args.source, args.out, args.shards, args.partition, args.seed,
                               args.val_fraction, args.compression)
    sys.stdout.write(f"wrote {args.out}: {manifest['num_shards']} shards, "
                     f"{manifest['num_examples']} training + {manifest['val']['count']} validation examples "
                     f"({manifest['val_rule']}), partition {manifest['partition']}\n")
    return 0


def format_table(manifest: dict, root: str = "") -> str:
    """The manifest as a readable table: examples and class balance per shard file."""
    classes = int(manifest.get("num_classes", 0))
    head = [
        f"shard directory {root}" if root else "shard directory",
        f"  source {manifest.get('source')} ({manifest.get('source_spec', '?')}), "
        f"partition {manifest.get('partition')}, seed {manifest.get('seed')}, "
        f"validation: {manifest.get('val_rule', '?')}",
        f"  x {manifest['x_dtype']} {tuple(manifest['x_shape'])}, y {manifest.get('y_dtype')} "
        f"{tuple(manifest.get('y_shape', []))}, {classes} classes, compression "
        f"{manifest.get('compression')}, chunks of {manifest.get('chunk_examples')} examples",
        "",
    ]
    entries = list(manifest["shards"]) + [manifest["val"]]
    show_counts = 0 < classes <= 20
    cols = ["file", "examples", "MiB"]
    if classes:
        cols += ["classes", "max share", "min share"]
    if show_counts:
        cols += [f"c{c}" for c in range(classes)]
    rows: List[List[str]] = []
    for e in entries:
        row = [e["file"], str(e["count"]), f"{e.get('bytes', 0) / 2**20:.2f}"]
        if classes:
            counts = np.asarray(e.get("class_counts") or [0] * classes, dtype=np.int64)
            share = counts / max(int(counts.sum()), 1)
            row += [str(int((counts > 0).sum())), f"{share.max():.3f}", f"{share.min():.3f}"]
            if show_counts:
                row += [str(int(c)) for c in counts]
        rows.append(row)
    total = [row for row in rows[:-1]]
    summary = ["total (train)", str(sum(int(e["count"]) for e in manifest["shards"])),
               f"{sum(e.get('bytes', 0) for e in manifest['shards']) / 2**20:.2f}"]
    if classes:
        counts = np.sum([np.asarray(e.get("class_counts") or [0] * classes)
                         for e in manifest["shards"]], axis=0)
        share = counts / max(int(counts.sum()), 1)
        summary += [str(int((counts > 0).sum())), f"{share.max():.3f}", f"{share.min():.3f}"]
        if show_counts:
            summary += [str(int(c)) for c in counts]
    rows = total + [summary, rows[-1]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))

    lines = head + [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    if classes:
        lines.append("(max/min share: largest/smallest fraction of one class in the file; "
                     "cK: examples of class K)")
    return "\n".join(lines) + "\n"


def cmd_inspect(args: Any) -> int:
    """Run ``inspect``: print the table (after checking checksums with --verify)."""
    manifest = read_manifest(args.dir)
    entries = list(manifest["shards"]) + [manifest["val"]]
    if args.verify:
        verify_files(args.dir, entries)
        verify_contents(args.dir, manifest)
    else:
        check_files(args.dir, entries)
    sys.stdout.write(format_table(manifest, args.dir))
    if args.verify:
        sys.stdout.write(f"verified sha256, shapes, labels and counts of {manifest['num_shards'] + 1} "
                         "files: ok\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m hpc_dgrab.data``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(args.debug, rank=0)
    try:
        if args.command == "shard":
            return cmd_shard(args)
        return cmd_inspect(args)
    except (ShardError, SourceError) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        name = getattr(exc, "filename", None) or args.__dict__.get("out") or args.__dict__.get("dir")
        raise UserError(f"{name}: {exc.strerror or exc}") from None


def cli() -> None:
    """Console-script entry point: :func:`main` under the one-line error contract."""
    run_main(main)


if __name__ == "__main__":
    cli()
