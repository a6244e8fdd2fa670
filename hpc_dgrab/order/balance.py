"""Pure balancing kernels (numpy, no MPI): signs, the front/back reorder rule, whole-epoch references.

Everything here works on float64 arrays. The sign of a balancing step is made *reproducible across
processes*: :func:`balance_sign` accepts the fast BLAS dot product only when it is farther from zero
than any summation order's rounding error could move it, and otherwise decides with
``math.fsum`` (correctly rounded, hence identical in every process). So two ranks holding
bit-identical ``s`` and ``c`` always take the same sign, whatever their BLAS or memory alignment.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

_U = 2.0 ** -53  # unit round-off of float64

Unit = Tuple[int, ...]  # the example indices of one balancing unit (one example or one micro-batch)


def balance_sign(s: np.ndarray, c: np.ndarray) -> int:
    """+1 if ``<s, c> <= 0`` else -1 (the herding rule ``||s + c|| <= ||s - c||``), reproducibly."""
    dot = float(np.dot(s, c))
    n = s.size
    # Higham's bound for any order of summation: |fl(dot) - dot| <= gamma_n * sum|s_i c_i|; x2 margin
    # also covers the rounding of the bound itself and of fsum's rounded products.
    mag = float(np.dot(np.abs(s), np.abs(c)))
    if mag == 0.0:  # every product is zero (e.g. s = 0 at the start of an epoch): an exact tie
        return 1
    bound = 2.0 * (n + 2) * _U / (1.0 - (n + 2) * _U) * mag
    if not abs(dot) > bound:  # near a tie (or NaN): decide with the correctly rounded sum
        dot = math.fsum((s * c).tolist())
    return 1 if dot <= 0 else -1



def herd_signs(base: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """Signs of K vectors c_k balanced in turn against a running sum s, from inner products only.

    ``base[k] = <s, c_k>``, ``cross[l, k] = <c_l, c_k>``; eps_k = +1 iff
    ``<s + sum_{l<k} eps_l c_l, c_k> = base[k] + sum_{l<k} eps_l cross[l, k] <= 0`` (else -1; a NaN
    gives -1 as in :func:`balance_sign`). Returns the signs (K,) as int64. The sums are plain float64
    additions in a fixed order, so one process always decides the same way; unlike
    :func:`balance_sign` a decision within rounding of zero is not made exactly.
    """
    base = np.asarray(base, dtype=np.float64)
    k_n = len(base)
    eps = np.empty(k_n, dtype=np.int64)
    acc = np.zeros(k_n)
    for k in range(k_n):
        e = 1 if base[k] + acc[k] <= 0 else -1
        eps[k] = e
        if k + 1 < k_n:
            acc[k + 1:] += e * cross[k, k + 1:]
    return eps


def payload_block(d: int, blocks: int, step: int) -> slice:
    """The coordinates of a d-vector sent at ``step`` when a payload is cut into ``blocks`` blocks:
    block ``step % blocks`` of ``blocks`` contiguous near-equal blocks (the same on every rank)."""
    j = step % blocks
    return slice(j * d // blocks, (j + 1) * d // blocks)


def send_block(residual: np.ndarray, update: np.ndarray, block: slice) -> np.ndarray:
    """Error feedback on a block of coordinates: ``residual += update``, then return a copy of
    ``residual[block]`` (what is sent) and zero it in ``residual`` (in place).

    Nothing is lost: the returned block placed back into the zeroed ``residual`` gives exactly
    ``old residual + update`` as rounded once in ``residual``'s dtype; the unsent coordinates wait in
    ``residual`` for their block's turn."""
    np.add(residual, update, out=residual, casting="same_kind")
    sent = residual[block].copy()
    residual[block] = 0
    return sent


class Reorder:
    """The GraB reorder rule: "+" units fill the next order from the front in visit order, "-" units
    from the back (so the back half comes out reversed); units never visited keep their relative
    order in the middle."""

    def __init__(self) -> None:
        self.front: List[Unit] = []
        self.back: List[Unit] = []

    def place(self, unit: Sequence[int], eps: int) -> None:
        """Put one unit at the front (``eps = +1``) or the back (``eps = -1``)."""
        (self.front if eps > 0 else self.back).append(tuple(int(i) for i in unit))

    def place_pair(self, first: Sequence[int], second: Sequence[int], eps: int) -> None:
        """Pair (first, second) balanced with sign ``eps`` on ``first - second``."""
        if eps > 0:
            self.place(first, 1)
            self.place(second, -1)
        else:
            self.place(second, 1)
            self.place(first, -1)

    def finish(self, current: np.ndarray) -> np.ndarray:
        """The next order: front, then ``current``'s unvisited examples, then the reversed back."""
        placed = [i for u in self.front for i in u] + [i for u in reversed(self.back) for i in u]
        seen = np.zeros(len(current), dtype=bool)
        seen[placed] = True
        if seen.sum() != len(placed):
            raise ValueError("an example was balanced twice in one epoch")
        middle = [int(i) for i in current if not seen[i]]
        nf = sum(len(u) for u in self.front)
        return np.asarray(placed[:nf] + middle + placed[nf:], dtype=np.int64)

    def state_dict(self) -> Dict[str, list]:
        return {"front": [list(u) for u in self.front], "back": [list(u) for u in self.back]}

    def load_state_dict(self, state: Dict[str, list]) -> None:
        self.front = [tuple(int(i) for i in u) for u in state.get("front", [])]
        self.back = [tuple(int(i) for i in u) for u in state.get("back", [])]


# ---------------------------------------------------------------- whole-epoch reference functions

def pair_balance(grads: np.ndarray, order: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """PairBalance over one epoch: ``grads[i]`` is example i's gradient, visited in ``order``.

    Returns (next order, final running sum). An odd last example is balanced alone.
    """
    g = np.asarray(grads, dtype=np.float64)
    s = np.zeros(g.shape[1])
    re = Reorder()
    m = len(order)
    for k in range(0, m - 1, 2):
        a, b = int(order[k]), int(order[k + 1])
        c = g[a] - g[b]
        eps = balance_sign(s, c)
        s += eps * c
        re.place_pair((a,), (b,), eps)
    if m % 2:
        a = int(order[-1])
        eps = balance_sign(s, g[a])
        s += eps * g[a]
        re.place((a,), eps)
    return re.finish(np.asarray(order)), s


def fold_exact(s: np.ndarray, diffs: np.ndarray) -> np.ndarray:
    """D-GraB's coordinated fold of one pair-step: ``diffs[j]`` is worker j's difference; signs in
    worker order against one running sum ``s`` (updated in place). Returns the signs (n,)."""
    eps = np.empty(len(diffs), dtype=np.int64)
    for j, c in enumerate(diffs):
        eps[j] = balance_sign(s, c)
        s += eps[j] * c
    return eps


def fold_parallel(s: np.ndarray, diffs: np.ndarray) -> np.ndarray:
    """The "parallel" fold: every worker signs against the same ``s``; then ``s`` += the signed sum."""
    eps = np.array([balance_sign(s, c) for c in diffs], dtype=np.int64)
    s += (eps[:, None] * diffs).sum(0) if len(diffs) else 0.0
    return eps


def coordinated_pair_balance(grads: Sequence[np.ndarray], orders: Sequence[np.ndarray],
                             mode: str = "exact") -> Tuple[List[np.ndarray], np.ndarray]:
    """One epoch of PairBalance over n workers simulated in one process.

    ``grads[j][i]``: worker j's example i; ``orders[j]``: its visit order (all of the same length).
    ``mode``: ``exact`` (coordinated sequential fold in worker order), ``parallel`` (each signs
    against the same shared sum, one pair-step at a time), ``parallel-half`` (the same, but at
    pair-step k each worker sends only block ``k % 2`` of its unsent signed sums, see
    :func:`send_block`, and signs against the shared sum plus its own unsent sums) or
    ``independent`` (one sum per worker).
    Returns (next orders, signs array of shape (pair-steps, n)). An odd last example of each worker
    is balanced alone against the shared sum (its own sum when independent).
    """
    n = len(grads)
    m = len(orders[0])
    if any(len(o) != m for o in orders):
        raise ValueError("coordinated balancing needs the same number of examples on every worker")
    g = [np.asarray(x, dtype=np.float64) for x in grads]
    d = g[0].shape[1]
    shared = np.zeros(d)
    own = [np.zeros(d) for _ in range(n)]
    re = [Reorder() for _ in range(n)]
    signs = []
    for k in range(0, m - 1, 2):
        pairs = [(int(orders[j][k]), int(orders[j][k + 1])) for j in range(n)]
        diffs = np.stack([g[j][a] - g[j][b] for j, (a, b) in enumerate(pairs)])
        if mode == "exact":
            eps = fold_exact(shared, diffs)
        elif mode == "parallel":
            eps = fold_parallel(shared, diffs)
        elif mode == "independent":
            eps = np.array([fold_exact(own[j], diffs[j:j + 1])[0] for j in range(n)])
        elif mode == "parallel-half":   # own[j]: worker j's unsent signed sums
            eps = np.array([balance_sign(shared + own[j], diffs[j]) for j in range(n)], dtype=np.int64)
            block = payload_block(d, 2, k // 2)
            shared[block] += np.sum([send_block(own[j], eps[j] * diffs[j], block) for j in range(n)], axis=0)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        for j, (a, b) in enumerate(pairs):
            re[j].place_pair((a,), (b,), int(eps[j]))
        signs.append(eps)
    if m % 2:
        for j in range(n):
            a = int(orders[j][-1])
            eps_j = balance_sign(own[j] if mode == "independent" else
                                 shared + own[j] if mode == "parallel-half" else shared, g[j][a])
            re[j].place((a,), eps_j)
    return [re[j].finish(np.asarray(orders[j])) for j in range(n)], np.array(signs).reshape(-1, n)


def herding_bound(vectors: Sequence[np.ndarray], orders: Sequence[np.ndarray],
                  per_step: bool = True) -> float:
    """max over prefixes of ||running sum||_inf along the interleaved global order.

    The global order visits position t of every worker (worker 0, 1, ..., n-1) before position t+1.
    ``per_step=True`` (the synchronous-SGD view, as in the D-GraB paper's simulation) takes prefixes
    only at whole global steps (after position t of every worker, whose examples are averaged in
    one step); ``per_step=False`` takes every prefix, worker by worker. Vectors are used as given
    (centre them first).
    """
    n = len(vectors)
    m = min(len(o) for o in orders)
    seq = np.stack([np.asarray(vectors[j])[np.asarray(orders[j][:m])] for j in range(n)], axis=1)
    steps = seq.sum(axis=1) if per_step else seq.reshape(n * m, -1)
    prefix = np.cumsum(steps, axis=0)
    return float(np.abs(prefix).max()) if prefix.size else 0.0
