"""Per-epoch metrics as strict JSON Lines: one object per epoch, each epoch exactly once.

Format: every line is one JSON object (RFC 8259: no ``NaN``/``Infinity`` literals) with at least
``epoch`` (epochs completed, 1-based); the trainer adds ``train_loss``, ``val_loss``, ``val_acc``,
``epoch_time_s``, ``comm_bytes`` and, for gossip, ``staleness_avg``/``staleness_max``. A value
that is legitimately missing is ``null``; a non-finite number is refused (:class:`MetricsError`),
since it means a diverged run, which must stop instead of being recorded.

Two ways of writing a :class:`MetricsLog`:

* rewrite (default, rank 0 of a synchronous run): the whole file is rewritten atomically after
  every epoch, so a reader never sees a half-written line;
* ``append_lines=True`` (per-rank streams, e.g. ``FILE.rank<R>`` from :func:`rank_path` for a
  gossip rank): each record is appended as one line and fsynced when the epoch ends, so a crash
  keeps every finished epoch; a torn last line left by a crash is dropped on resume.

On resume (``resume_epoch`` = epochs completed at the checkpoint) the records of epochs up to
``resume_epoch`` are kept and later ones dropped, so that every epoch appears exactly once.
:func:`read_jsonl` is the one reader of these files (tests, plots and benchmarks use it).
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional

import numpy as np

from hpc_dgrab import fileio
from hpc_dgrab.errors import UserError

log = logging.getLogger(__name__)


class MetricsError(UserError, ValueError):
    """A metrics file that cannot be read, or a record that cannot be written; one line."""


def rank_path(path: str, rank: int) -> str:
    """The per-rank stream beside ``path``: ``FILE.rank<R>``."""
    return f"{path}.rank{rank}"


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON types; MetricsError for a non-finite number (naming ``where``)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise MetricsError(f"metrics: {where} is {float(value)}; non-finite numbers are not recorded "
                               "(use None for a missing value)")
        return float(value)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise MetricsError(f"metrics: {where} has type {type(value).__name__}, which is not JSON")


def to_line(record: Dict[str, Any]) -> str:
    """One record as one strict-JSON line (with the newline); MetricsError if it cannot be."""
    if not isinstance(record, dict):
        raise MetricsError(f"metrics: a record must be a dict, got {type(record).__name__}")
    plain = {str(k): _plain(v, str(k)) for k, v in record.items()}
    return json.dumps(plain, allow_nan=False, separators=(", ", ": ")) + "\n"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def read_jsonl(path: str, allow_torn_tail: bool = False) -> List[Dict[str, Any]]:
    """Every record of a JSON Lines file, strictly parsed (no NaN/Infinity, objects only).

    Blank lines are skipped. With ``allow_torn_tail`` an unparsable last line without a newline
    (an append cut short by a crash) is dropped with a warning. Raises :class:`MetricsError`
    ``"PATH:LINE: ..."`` for a missing file or a bad line.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MetricsError(f"{path}: is a directory, not a JSON Lines file") from None
    except UnicodeDecodeError:
        raise MetricsError(f"{path}: not a text file") from None
    except OSError as exc:
        raise MetricsError(f"{path}: {exc.strerror or exc}") from None
    lines = text.split("\n")
    records: List[Dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line, parse_constant=_refuse_constant)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except ValueError as exc:
            torn = number == len(lines) and not text.endswith("\n")
            if allow_torn_tail and torn:
                log.warning("%s:%d: dropping a torn last line (%s)", path, number, exc)
                break
            why = str(exc).splitlines()[0]
            raise MetricsError(f"{path}:{number}: not a JSON object line ({why})") from None
        records.append(rec)
    return records


def _epoch(rec: Dict[str, Any], where: str) -> int:
    epoch = rec.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise MetricsError(f"{where}: record without an integer 'epoch': {json.dumps(rec)[:80]}")
    return epoch


class MetricsLog:
    """The epoch records of one run in ``path`` (nothing is written when ``path`` is None).

    ``resume_epoch > 0`` keeps the file's records of epochs ``<= resume_epoch`` (and rewrites the
    file without the later ones); otherwise an existing file is replaced at the first append.
    ``append_lines`` selects the append-and-fsync mode (see the module docstring).
    """

    def __init__(self, path: Optional[str], resume_epoch: int = 0, append_lines: bool = False) -> None:
        self.path = path
        self.append_lines = append_lines
        self.records: List[Dict[str, Any]] = []
        self._fresh = True  # the file on disk is not ours yet: the first write replaces it
        if path and resume_epoch > 0 and os.path.exists(path):
            found = read_jsonl(path, allow_torn_tail=append_lines)
            self.records = [r for r in found if _epoch(r, path) <= resume_epoch]
            seen = [r["epoch"] for r in self.records]
            if seen != sorted(set(seen)):
                raise MetricsError(f"{path}: epochs {seen} are not each recorded once in order")
            if len(self.records) != len(found) or append_lines:
                self._rewrite()
            self._fresh = False

    @property
    def last_epoch(self) -> int:
        """The epoch of the newest record (0 when there is none)."""
        return self.records[-1]["epoch"] if self.records else 0

    def append(self, record: Dict[str, Any]) -> None:
        """Add one epoch's record (its ``epoch`` must be newer than the last) and write it out."""
        epoch = _epoch(record, self.path or "metrics")
        if epoch <= self.last_epoch:
            raise MetricsError(f"{self.path or 'metrics'}: epoch {epoch} recorded after epoch "
                               f"{self.last_epoch}")
        line = to_line(record)
        self.records.append(json.loads(line))
        if not self.path:
            return
        if self.append_lines and not self._fresh:
            try:
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(line)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:  # a full disk: one line naming the file, not an internal error
                raise MetricsError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
        else:
            self._rewrite()
            self._fresh = False

    def _rewrite(self) -> None:
        if self.path:
            try:
                fileio.write_text(self.path, "".join(to_line(r) for r in self.records))
            except OSError as exc:  # a full disk: one line naming the file, not an internal error
                raise MetricsError(f"{self.path}: cannot write: {exc.strerror or exc}") from None


def format_epoch(rec: Dict[str, Any], epochs: int) -> str:
    """One human-readable progress line for an epoch's record (missing values are skipped)."""
    def num(key: str) -> Optional[float]:
        value = rec.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    parts = [f"epoch {rec['epoch']:>3}/{epochs}"]
    for key, fmt in (("train_loss", "train_loss {:.4f}"), ("val_loss", "val_loss {:.4f}")):
        if (loss := num(key)) is not None:
            parts.append(fmt.format(loss))
    if (val_acc := num("val_acc")) is not None:
        parts.append(f"val_acc {100 * val_acc:.2f}%")
    if (epoch_time := num("epoch_time_s")) is not None:
        parts.append(f"time {epoch_time:.2f}s")
    if (comm := num("comm_bytes")) is not None:
        parts.append(f"comm {comm / 1e6:.2f} MB")
    if (staleness := num("staleness_avg")) is not None:
        parts.append(f"staleness avg {staleness:.2f} max {rec.get('staleness_max')}")
    return "  ".join(parts)
