"""Communication graphs for gossip: pure numpy, no MPI.

A :class:`Topology` is a directed graph on ``n`` ranks (an undirected graph is stored with both
directions of every edge), possibly *time-varying*: a sequence of ``period`` graphs of which step
``t`` uses graph ``t % period`` (``one-peer-exponential``). Edge ``(i, j)`` means "rank i sends to
rank j": ``j`` is an out-neighbour of ``i`` and ``i`` an in-neighbour of ``j``.

Mixing matrices follow the convention ``W[receiver, sender]``, so one synchronous gossip round is
``x_new = W @ x``:

* ``metropolis`` (undirected graphs only): ``W[i, j] = 1 / (1 + max(deg i, deg j))`` on edges,
  the rest of the row on the diagonal. Symmetric and doubly stochastic.
* ``uniform``: every sender splits its value equally over itself and its out-neighbours,
  ``W[j, i] = 1 / (outdeg i + 1)``. Column-stochastic (columns sum to 1): the mixing for push-sum,
  which averages correctly on directed and time-varying graphs.

Every constructor validates its graph and raises ``ValueError`` with a one-line reason for a bad
one (rank out of range, self-loop, duplicate edge, disconnected graph, n < 1, unknown name,
hypercube with n not a power of two).

Example::

    topo = Topology.from_name("ring", 8)
    topo.out_neighbors(3)               # [2, 4]
    topo.mixing_matrix("metropolis")    # 8 x 8, symmetric, doubly stochastic
    topo.spectral_gap()                 # 1 - (1/3 + 2/3 cos(2 pi / 8))
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

log = logging.getLogger(__name__)

Edge = Tuple[int, int]

#: Names accepted by :meth:`Topology.from_name` (``erdos-renyi`` and ``random-regular`` take
#: a parameter after a colon: ``erdos-renyi:0.3``, ``random-regular:3``).
NAMES = ("ring", "torus", "hypercube", "exponential", "one-peer-exponential", "star", "complete",
         "erdos-renyi:P", "random-regular:K")

#: How many random graphs ``erdos-renyi`` / ``random-regular`` draw before giving up on connectivity.
MAX_DRAWS = 1000


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _exponential_distances(n: int) -> List[int]:
    """1, 2, 4, ... below n (the peer distances of the exponential graphs)."""
    out, d = [], 1
    while d < n:
        out.append(d)
        d *= 2
    return out


def _near_square(n: int) -> Tuple[int, int]:
    """(rows, cols) with rows * cols == n and rows the largest divisor <= sqrt(n)."""
    rows = int(math.isqrt(n))
    while n % rows:
        rows -= 1
    return rows, n // rows


def _reachable(n: int, adj: Sequence[Iterable[int]], start: int = 0) -> Set[int]:
    seen = {start}
    stack = [start]
    while stack:
        u = stack.pop()
        for v in adj[u]:
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return seen


class Topology:
    """A (possibly time-varying) directed communication graph on ``n`` ranks.

    Build one with :meth:`from_name` or :meth:`from_edges`; ``Topology(n, phases, directed, name)``
    takes ``phases`` as a list of edge collections (one per step of the period) and validates them.
    """

    def __init__(self, n: int, phases: Sequence[Iterable[Edge]], directed: bool, name: str = "custom",
                 check_connected: bool = True) -> None:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"topology needs n >= 1 ranks, got {n!r}")
        if len(phases) < 1:
            raise ValueError("topology needs at least one graph")
        self.n = int(n)
        self.directed = bool(directed)
        self.name = name
        self._phases: List[FrozenSet[Edge]] = []
        self._out: List[List[List[int]]] = []
        self._in: List[List[List[int]]] = []
        for edges in phases:
            arcs = self._validate(edges)
            self._phases.append(frozenset(arcs))
            out: List[List[int]] = [[] for _ in range(self.n)]
            inn: List[List[int]] = [[] for _ in range(self.n)]
            for i, j in sorted(arcs):
                out[i].append(j)
                inn[j].append(i)
            self._out.append(out)
            self._in.append(inn)
        if check_connected and not self.is_connected():
            kind = "strongly connected" if self.directed else "connected"
            raise ValueError(f"topology {name!r} on {self.n} ranks is not {kind}")

    def _validate(self, edges: Iterable[Edge]) -> Set[Edge]:
        arcs: Set[Edge] = set()
        for edge in edges:
            try:
                i, j = (int(v) for v in edge)
            except (TypeError, ValueError):
                raise ValueError(f"edge {edge!r} is not a pair of ranks") from None
            if not (0 <= i < self.n and 0 <= j < self.n):
                raise ValueError(f"edge ({i}, {j}) has a rank outside 0..{self.n - 1}")
            if i == j:
                raise ValueError(f"edge ({i}, {j}) is a self-loop")
            pair = [(i, j)] if self.directed else [(i, j), (j, i)]
            if (i, j) in arcs:
                raise ValueError(f"duplicate edge ({i}, {j})")
            arcs.update(pair)
        return arcs

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_edges(cls, n: int, edges: Iterable[Edge], directed: bool = False,
                   name: str = "custom") -> Topology:
        """A static graph from an edge list (``(i, j)``: i sends to j; both ways when undirected)."""
        return cls(n, [list(edges)], directed=directed, name=name)

    @classmethod
    def from_name(cls, name: str, n: int, seed: int = 0) -> Topology:
        """A named graph on ``n`` ranks; ``seed`` fixes the random ones. See :data:`NAMES`."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"topology needs n >= 1 ranks, got {n!r}")
        n = int(n)
        base, _, param = str(name).strip().lower().partition(":")
        builders: Dict[str, Callable[[], Topology]] = {
            "ring": lambda: cls._ring(n),
            "torus": lambda: cls._torus(n),
            "hypercube": lambda: cls._hypercube(n),
            "exponential": lambda: cls._exponential(n),
            "one-peer-exponential": lambda: cls._one_peer_exponential(n),
            "star": lambda: cls(n, [[(0, j) for j in range(1, n)]], directed=False, name="star"),
            "complete": lambda: cls(n, [[(i, j) for i in range(n) for j in range(i + 1, n)]],
                                    directed=False, name="complete"),
            "erdos-renyi": lambda: cls._erdos_renyi(n, param, seed),
            "random-regular": lambda: cls._random_regular(n, param, seed),
        }
        if base not in builders:
            raise ValueError(f"unknown topology {name!r}; choose from: {', '.join(NAMES)}")
        if param and base not in ("erdos-renyi", "random-regular"):
            raise ValueError(f"topology {base!r} takes no parameter, got {name!r}")
        return builders[base]()

    @classmethod
    def _ring(cls, n: int) -> Topology:
        edges = {(min(i, (i + 1) % n), max(i, (i + 1) % n)) for i in range(n) if n > 1}
        return cls(n, [sorted(edges)], directed=False, name="ring")

    @classmethod
    def _torus(cls, n: int) -> Topology:
        rows, cols = _near_square(n)
        edges: Set[Edge] = set()
        for r in range(rows):
            for c in range(cols):
                i = r * cols + c
                for j in (r * cols + (c + 1) % cols, ((r + 1) % rows) * cols + c):
                    if j != i:
                        edges.add((min(i, j), max(i, j)))
        return cls(n, [sorted(edges)], directed=False, name=f"torus({rows}x{cols})")

    @classmethod
    def _hypercube(cls, n: int) -> Topology:
        if not _is_power_of_two(n):
            raise ValueError(f"hypercube needs n a power of two, got {n}")
        edges = [(i, i ^ d) for i in range(n) for d in _exponential_distances(n) if i < i ^ d]
        return cls(n, [edges], directed=False, name="hypercube")

    @classmethod
    def _exponential(cls, n: int) -> Topology:
        edges = [(i, (i + d) % n) for i in range(n) for d in _exponential_distances(n)]
        return cls(n, [edges], directed=True, name="exponential")

    @classmethod
    def _one_peer_exponential(cls, n: int) -> Topology:
        dists = _exponential_distances(n) or [0]
        phases = [[(i, (i + d) % n) for i in range(n)] if d else [] for d in dists]
        return cls(n, phases, directed=True, name="one-peer-exponential")

    @staticmethod
    def _param(base: str, param: str, kind: type) -> float:
        try:
            return kind(param)
        except ValueError:
            what = "a probability P" if kind is float else "a degree K"
            raise ValueError(f"{base} needs {what}: '{base}:{'0.3' if kind is float else '3'}', "
                             f"got {param!r}") from None

    @classmethod
    def _erdos_renyi(cls, n: int, param: str, seed: int) -> Topology:
        p = cls._param("erdos-renyi", param, float)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"erdos-renyi needs 0 < P <= 1, got {p}")
        rng = np.random.default_rng(seed)
        iu, ju = np.triu_indices(n, k=1)
        for _ in range(MAX_DRAWS):
            keep = rng.random(iu.size) < p
            edges = list(zip(iu[keep].tolist(), ju[keep].tolist()))
            topo = cls(n, [edges], directed=False, name=f"erdos-renyi:{p:g}", check_connected=False)
            if topo.is_connected():
                return topo
        raise ValueError(f"erdos-renyi:{p:g} on {n} ranks was disconnected in {MAX_DRAWS} draws; "
                         f"raise P")

    @classmethod
    def _random_regular(cls, n: int, param: str, seed: int) -> Topology:
        k = int(cls._param("random-regular", param, int))
        if not 0 < k < n or (n * k) % 2:
            raise ValueError(f"random-regular:{k} on {n} ranks needs 0 < K < n and n*K even")
        rng = np.random.default_rng(seed)
        for _ in range(MAX_DRAWS):
            edges = cls._pairing(n, k, rng)
            if edges is None:
                continue
            topo = cls(n, [edges], directed=False, name=f"random-regular:{k}", check_connected=False)
            if topo.is_connected():
                return topo
        raise ValueError(f"random-regular:{k} on {n} ranks: no connected simple graph in "
                         f"{MAX_DRAWS} draws")

    @staticmethod
    def _pairing(n: int, k: int, rng: np.random.Generator) -> Optional[List[Edge]]:
        """One draw of the configuration model with greedy repair; None when it got stuck."""
        stubs: List[int] = [int(v) for v in np.repeat(np.arange(n), k)]
        edges: Set[Edge] = set()
        while stubs:
            order = rng.permutation(len(stubs))
            stubs = [stubs[t] for t in order]
            left: List[int] = []
            progress = False
            for a, b in zip(stubs[0::2], stubs[1::2]):
                e = (min(a, b), max(a, b))
                if a != b and e not in edges:
                    edges.add(e)
                    progress = True
                else:
                    left += [a, b]
            if not progress:
                return None
            stubs = left
        return sorted(edges)

    # ----------------------------------------------------------------- queries
    @property
    def period(self) -> int:
        """Number of distinct graphs a time-varying topology cycles through (1 when static)."""
        return len(self._phases)

    @property
    def time_varying(self) -> bool:
        return self.period > 1

    def _phase(self, step: int) -> int:
        return int(step) % self.period

    def _check_rank(self, rank: int) -> int:
        if not 0 <= int(rank) < self.n:
            raise ValueError(f"rank {rank} outside 0..{self.n - 1}")
        return int(rank)

    def edges(self, step: int = 0) -> List[Edge]:
        """All arcs ``(sender, receiver)`` used at ``step`` (both directions when undirected)."""
        return sorted(self._phases[self._phase(step)])

    def out_neighbors(self, rank: int, step: int = 0) -> List[int]:
        """Ranks that ``rank`` sends to at ``step`` (sorted)."""
        return list(self._out[self._phase(step)][self._check_rank(rank)])

    def in_neighbors(self, rank: int, step: int = 0) -> List[int]:
        """Ranks that ``rank`` receives from at ``step`` (sorted)."""
        return list(self._in[self._phase(step)][self._check_rank(rank)])

    def all_out_neighbors(self, rank: int) -> List[int]:
        """Every rank ``rank`` sends to at some step of the period."""
        r = self._check_rank(rank)
        return sorted({j for out in self._out for j in out[r]})

    def all_in_neighbors(self, rank: int) -> List[int]:
        """Every rank ``rank`` receives from at some step of the period."""
        r = self._check_rank(rank)
        return sorted({i for inn in self._in for i in inn[r]})

    def out_degree(self, rank: int, step: int = 0) -> int:
        return len(self._out[self._phase(step)][self._check_rank(rank)])

    def in_degree(self, rank: int, step: int = 0) -> int:
        return len(self._in[self._phase(step)][self._check_rank(rank)])

    def adjacency(self, step: int = 0) -> np.ndarray:
        """``A[i, j] = 1`` when i sends to j at ``step`` (n x n, int)."""
        a = np.zeros((self.n, self.n), dtype=np.int64)
        for i, j in self._phases[self._phase(step)]:
            a[i, j] = 1
        return a

    def is_connected(self) -> bool:
        """Strongly connected (the union of the period's graphs when time-varying)."""
        union = set().union(*self._phases)
        out: List[List[int]] = [[] for _ in range(self.n)]
        inn: List[List[int]] = [[] for _ in range(self.n)]
        for i, j in union:
            out[i].append(j)
            inn[j].append(i)
        return len(_reachable(self.n, out)) == self.n and len(_reachable(self.n, inn)) == self.n

    def mixing_matrix(self, kind: str = "metropolis", step: int = 0) -> np.ndarray:
        """The n x n gossip matrix ``W[receiver, sender]`` at ``step``; see the module docstring."""
        phase = self._phase(step)
        w = np.zeros((self.n, self.n), dtype=np.float64)
        if kind == "metropolis":
            if self.directed:
                raise ValueError(f"metropolis mixing needs an undirected graph; {self.name!r} is "
                                 f"directed (use 'uniform' with push-sum)")
            deg = [len(o) for o in self._out[phase]]
            for i, j in self._phases[phase]:
                w[i, j] = 1.0 / (1.0 + max(deg[i], deg[j]))
            w[np.diag_indices(self.n)] = 1.0 - w.sum(axis=1)
        elif kind == "uniform":
            for i in range(self.n):
                share = 1.0 / (len(self._out[phase][i]) + 1)
                w[i, i] = share
                for j in self._out[phase][i]:
                    w[j, i] = share
        else:
            raise ValueError(f"unknown mixing {kind!r}; choose metropolis or uniform")
        return w

    def spectral_gap(self, kind: Optional[str] = None, step: int = 0) -> float:
        """1 - the second-largest eigenvalue modulus of the mixing matrix at ``step``.

        ``kind`` defaults to ``metropolis`` for undirected and ``uniform`` for directed graphs.
        """
        kind = kind or ("uniform" if self.directed else "metropolis")
        if self.n == 1:
            return 1.0
        moduli = np.sort(np.abs(np.linalg.eigvals(self.mixing_matrix(kind, step))))[::-1]
        return float(1.0 - moduli[1])

    def __repr__(self) -> str:
        kind = "directed" if self.directed else "undirected"
        tv = f", period={self.period}" if self.time_varying else ""
        return f"Topology({self.name!r}, n={self.n}, {kind}{tv})"
