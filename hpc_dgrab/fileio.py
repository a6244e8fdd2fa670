"""Atomic file writing: write to a temporary file beside the target, then rename over it.

A reader never sees a half-written file, and a crash leaves the old file (or none) in place.
:func:`output_problem` checks an output path before any work is done (a command calls it for every
output it will write, so that a bad path is one line before the first step, not a failure after
hours).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, Optional, Protocol


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path in the target's directory; rename it to ``path`` on success."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def output_problem(path: str, what: str, directory: bool = False) -> Optional[str]:
    """One line when ``path`` cannot be written (``what`` names the option), else None.

    Creates the directory (``path`` itself, or the file's parent) and a probe file in it, which is
    removed again: the one test that holds for read-only file systems, permissions, quotas, a
    file where a directory should be, and ``root`` alike."""
    if not directory and os.path.isdir(path):
        return f"{what} {path}: is a directory, not a file"
    folder = path if directory else os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{what} {path}: cannot write in {folder}: {exc.strerror or exc}"
    return None


def write_text(path: str, text: str) -> None:
    """Atomically write ``text`` to ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


def write_json(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class Figure(Protocol):
    """What :func:`save_figure` needs of a figure (a matplotlib ``Figure`` is one)."""

    def savefig(self, fname: str, **kwargs: Any) -> None: ...


def save_figure(fig: Figure, path: str, **kwargs: Any) -> None:
    """Atomically save a figure (format from the extension of ``path``)."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)
