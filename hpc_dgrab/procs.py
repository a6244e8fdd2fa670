"""Child processes that never outlive a timeout: the whole process group goes, not just the child.

``subprocess.run(..., timeout=T)`` kills only the direct child; under ``launch/local`` that is
``mpirun``, and SIGKILL gives it no chance to end its ranks, which then keep running (and holding
cores, ports and MPI session state) after the caller has moved on. :func:`run` starts the child in
a session of its own and kills the whole group when the time is up.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Any, Optional, Sequence


def run(cmd: Sequence[str], timeout: Optional[float] = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)``; on timeout the child's whole
    process group is killed, then ``subprocess.TimeoutExpired`` is raised as usual."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    with subprocess.Popen(list(cmd), start_new_session=True, **_popen_kwargs(kwargs)) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _kill_group(proc)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, exc.timeout, output=out, stderr=err) from None
        except BaseException:
            _kill_group(proc)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _popen_kwargs(kwargs: dict) -> dict:
    out = dict(kwargs)
    if out.pop("capture_output", False):
        out["stdout"] = subprocess.PIPE
        out["stderr"] = subprocess.PIPE
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
