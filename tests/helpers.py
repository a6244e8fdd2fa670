"""Test helpers (the one module for them; fixtures live in conftest.py): run the package's commands
in a subprocess (under ``launch/local`` for several ranks) with a timeout, check one-line errors,
write metrics files, and the reference computations only tests use (class histograms, GraB's
whole-epoch MeanBalance, the flat synchronous reference ``FlatSync``)."""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from hpc_dgrab import procs
from hpc_dgrab.compress import GradientExchange
from hpc_dgrab.tensors import flat_grad, set_flat_grad

#: the checkout's root (the directory holding ``hpc_dgrab/``, ``launch/``, ``tests/``)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: files the tests read (e.g. checkpoints written by earlier versions), shared by every lane
DATA_DIR = os.path.join(ROOT, "tests", "data")


def child_env(**extra: str) -> Dict[str, str]:
    """This environment with the checkout first on ``PYTHONPATH`` (so a child imports this copy)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def run_cmd(args: List[str], ranks: int = 1, timeout: float = 300, cwd: str = ROOT,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` (under ``launch/local -n RANKS`` when RANKS > 1); capture output."""
    cmd = [sys.executable] + list(args)
    if ranks > 1:
        cmd = [os.path.join(ROOT, "launch", "local"), "-n", str(ranks), "--"] + cmd
    return procs.run(cmd, cwd=cwd, env=env if env is not None else child_env(),
                     timeout=timeout)   # a timeout kills the whole process group


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with exactly one ``error: ...`` line on stderr (and no traceback)."""
    assert proc.returncode != 0, proc
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def write_run(path, config=None, epochs=3, wall=False, missing_acc=False) -> str:
    """A metrics file of EPOCHS records (what the trainer writes) at PATH, for the plot tests."""
    from hpc_dgrab.metrics import MetricsLog

    log = MetricsLog(str(path))
    for e in range(1, epochs + 1):
        rec = {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.0,
               "val_acc": None if missing_acc else 0.1 * e, "epoch_time_s": 2.0, "comm_bytes": 0}
        if wall:
            rec["wall_s"] = 10.0 * e
        if config is not None:
            rec["config"] = config
        log.append(rec)
    return str(path)


def class_histograms(y: np.ndarray, parts: List[np.ndarray], num_classes: int) -> np.ndarray:
    """``(shards, num_classes)`` counts of each class in each part."""
    y = np.asarray(y)
    return np.stack([np.bincount(y[p], minlength=num_classes)[:num_classes] for p in parts]) \
        if parts else np.zeros((0, num_classes), dtype=np.int64)


def mean_balance(grads: np.ndarray, order: np.ndarray,
                 stale_mean: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """GraB's MeanBalance over one epoch with the previous epoch's mean (``None`` = zeros).

    Returns (next order, mean of the *raw* gradients seen, i.e. the next epoch's stale mean).
    """
    from hpc_dgrab.order.balance import Reorder, balance_sign

    g = np.asarray(grads, dtype=np.float64)
    mu = np.zeros(g.shape[1]) if stale_mean is None else np.asarray(stale_mean, dtype=np.float64)
    s = np.zeros(g.shape[1])
    re = Reorder()
    total = np.zeros(g.shape[1])
    for i in order:
        c = g[int(i)] - mu
        eps = balance_sign(s, c)
        s += eps * c
        re.place((int(i),), eps)
        total += g[int(i)]
    return re.finish(np.asarray(order)), total / max(len(order), 1)


# ------------------------------------------------------------ the flat synchronous reference
# DistributedOptimizer and GradAlign are checked against this: backward (or a sorter's balance step),
# ONE GradientExchange.mean_ of the whole flat gradient with the sorter's payload in the same
# message, then the optimizer's step. Not part of the library.

def transport(comm: Any = None) -> Any:
    """A transport over ``comm`` (default the world); ``"self"``: this process alone."""
    from mpi4py import MPI

    from hpc_dgrab.comm import get_transport

    return get_transport("mpi", MPI.COMM_SELF if comm == "self" else comm)


class FlatSync:
    """Synchronous SGD through one flat exchange per step; ``order_bytes`` counts the payloads."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 exchange: GradientExchange) -> None:
        self.model, self.optimizer, self.loss_fn, self.exchange = model, optimizer, loss_fn, exchange
        self.order_bytes = 0

    @property
    def bytes_sent(self) -> int:
        return self.exchange.bytes_sent

    def step(self, x: torch.Tensor, y: torch.Tensor, sorter: Optional[Any] = None,
             indices: Optional[np.ndarray] = None) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        if sorter is not None and sorter.needs_grads:
            loss, grad, payload = sorter.balance_step(self.model, self.loss_fn, x, y, indices)
        else:
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            grad, payload = flat_grad(self.model), None
        if payload is not None:
            self.order_bytes += payload.numel() * grad.element_size()
        grad = grad.clone()
        payload_sum = self.exchange.mean_(grad, payload)
        if sorter is not None and sorter.needs_grads:
            sorter.apply_payload(payload_sum)
        set_flat_grad(self.model, grad)
        self.optimizer.step()
        return float(loss.detach())


def pickle_roundtrip(obj: Any, how: str) -> Any:
    """``obj`` written and read back by ``pickle`` (``how="pickle"``) or ``torch.save``/``torch.load``
    (a trusted object the test itself made, so ``weights_only=False``)."""
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ------------------------------------------------------------ every rank's exit code (branch rel)

@dataclasses.dataclass
class RankedRun:
    """A job run under ``launch/local`` with every rank's exit status recorded."""

    proc: subprocess.CompletedProcess
    codes: Dict[int, int]      # rank -> exit status (a signal death as its negative number)
    seconds: float             # from the launch to the launcher's exit

    def error_lines(self) -> List[str]:
        return [ln for ln in self.proc.stderr.splitlines() if ln.startswith("error: ")]


def run_ranked(args: List[str], ranks: int, workdir: str, timeout: float = 120,
               env: Optional[Dict[str, str]] = None, signals: Sequence[Tuple[float, int]] = (),
               ready: Optional[Callable[[], bool]] = None) -> RankedRun:
    """Run ``python ARGS`` on ``ranks`` ranks through ``tests/record_exit.py`` (each rank writes its
    exit status into ``workdir``). ``signals``: (delay s, signal) sent to the launcher after
    ``ready()`` turns true (polled; required with ``signals``). A job still running at ``timeout``
    is killed and the test fails (a hang)."""
    import time

    os.makedirs(workdir, exist_ok=True)
    wrapper = [sys.executable, os.path.join(ROOT, "tests", "record_exit.py"), workdir, "--"]
    cmd = [os.path.join(ROOT, "launch", "local"), "-n", str(ranks), "--"] + wrapper + [sys.executable] + args
    start = time.monotonic()
    with subprocess.Popen(cmd, cwd=ROOT, env=env if env is not None else child_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as p:
        try:
            if signals:
                assert ready is not None
                while not ready():
                    if p.poll() is not None or time.monotonic() - start > timeout:
                        raise AssertionError(f"the job ended or hung before it was ready: {p.communicate()}")
                    time.sleep(0.2)
                for delay, sig in signals:
                    time.sleep(delay)
                    p.send_signal(sig)
            out, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except BaseException:
            os.killpg(p.pid, 9)
            p.communicate()
            raise
    seconds = time.monotonic() - start
    codes = {}
    for name in os.listdir(workdir):
        if name.startswith("rank-") and name.endswith(".exit"):
            with open(os.path.join(workdir, name)) as fh:
                codes[int(name[5:-5])] = int(fh.read())
    return RankedRun(subprocess.CompletedProcess(cmd, p.returncode, out, err), codes, seconds)


# --- docs: the documentation's Python code blocks (tests/unit/test_docs.py, tests/system/test_docs_blocks.py)
#: a marker on the line right before a fence: ``<!-- run: np=N -->`` runs the block on N ranks
#: (launch/local), ``<!-- not-run: REASON -->`` marks it as not runnable; no marker: run on 1 process
DOC_MARKER = re.compile(r"^\s*<!--\s*(run|not-run)\s*:(.*?)-->\s*$")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class DocBlock:
    path: str            # relative to the checkout
    line: int            # 1-based line of the opening fence
    lang: str
    code: str
    marker: Optional[str]   # "run", "not-run" or None
    arg: str             # the marker's text after the colon, stripped
    marker_line: str     # the line before the fence when it looks like a marker comment, else ""

    @property
    def ranks(self) -> int:
        m = re.fullmatch(r"np\s*=\s*(\d+)", self.arg) if self.marker == "run" else None
        return int(m.group(1)) if m else 1


def doc_blocks(root: str = os.path.join(ROOT, "docs")) -> List[DocBlock]:
    """Every fenced code block of the Markdown files under ``root`` (any language)."""
    out: List[DocBlock] = []
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(n for n in names if n.endswith(".md")):
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
            i = 0
            while i < len(lines):
                m = _FENCE.match(lines[i])
                if not m:
                    i += 1
                    continue
                fence, lang, start = m.group(1), m.group(2).lower(), i
                i += 1
                body = []
                while i < len(lines) and not lines[i].strip().startswith(fence):
                    body.append(lines[i])
                    i += 1
                i += 1
                before = lines[start - 1] if start > 0 else ""
                mm = DOC_MARKER.match(before)
                out.append(DocBlock(os.path.relpath(path, ROOT), start + 1, lang, "\n".join(body) + "\n",
                                    mm.group(1) if mm else None, mm.group(2).strip() if mm else "",
                                    before if "<!--" in before else ""))
    return out


def doc_python_blocks(root: str = os.path.join(ROOT, "docs")) -> List[DocBlock]:
    return [b for b in doc_blocks(root) if b.lang in ("python", "py")]
