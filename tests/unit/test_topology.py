"""Topology: known values, mixing-matrix invariants, validation (serial, no MPI)."""
import math

import numpy as np
import pytest

from hpc_dgrab.comm.topology import Topology

STATIC = ["ring", "torus", "hypercube", "exponential", "star", "complete", "erdos-renyi:0.4",
          "random-regular:3"]


def test_ring_metropolis_spectral_gap_known_value():
    topo = Topology.from_name("ring", 8)
    w = topo.mixing_matrix("metropolis")
    assert np.allclose(w[0, [7, 0, 1]], 1 / 3) and w[0, 2] == 0
    expected = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / 8))
    assert topo.spectral_gap() == pytest.approx(expected, abs=1e-12)


def test_ring_neighbors():
    topo = Topology.from_name("ring", 8)
    assert topo.out_neighbors(0) == [1, 7] and topo.in_neighbors(3) == [2, 4]
    assert Topology.from_name("ring", 2).out_neighbors(0) == [1]
    assert Topology.from_name("ring", 1).out_neighbors(0) == []


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_exponential_and_hypercube_degrees_are_log2_n(n):
    exp = Topology.from_name("exponential", n)
    cube = Topology.from_name("hypercube", n)
    for r in range(n):
        assert exp.out_degree(r) == exp.in_degree(r) == int(math.log2(n))
        assert cube.out_degree(r) == int(math.log2(n))
    r = 3 % n
    assert exp.out_neighbors(r) == sorted((r + 2 ** k) % n for k in range(int(math.log2(n))))
    assert cube.out_neighbors(5 % n) == sorted((5 % n) ^ (1 << k) for k in range(int(math.log2(n))))


@pytest.mark.parametrize("name", STATIC + ["one-peer-exponential"])
@pytest.mark.parametrize("n", [1, 5, 8, 12])
def test_mixing_matrices_sum_to_one_along_the_right_axis(name, n):
    if name == "hypercube" and n not in (1, 8):
        pytest.skip("hypercube needs a power of two")
    if name == "random-regular:3" and (n < 4 or n * 3 % 2):
        pytest.skip("needs n > 3 and 3n even")
    topo = Topology.from_name(name, n, seed=1)
    assert topo.is_connected()
    for step in range(topo.period):
        u = topo.mixing_matrix("uniform", step)
        assert np.allclose(u.sum(axis=0), 1.0)       # column-stochastic: push-sum conserves mass
        assert (u >= 0).all()
        if not topo.directed:
            m = topo.mixing_matrix("metropolis", step)
            assert np.allclose(m, m.T) and np.allclose(m.sum(axis=0), 1) and np.allclose(m.sum(axis=1), 1)
            assert (m >= 0).all()
    if n > 1:
        assert 0 < topo.spectral_gap() <= 1


def test_complete_and_star_values():
    w = Topology.from_name("complete", 5).mixing_matrix("metropolis")
    assert np.allclose(w, 1 / 5)
    assert Topology.from_name("complete", 5).spectral_gap() == pytest.approx(1.0)
    star = Topology.from_name("star", 5)
    assert star.out_neighbors(0) == [1, 2, 3, 4] and star.out_neighbors(3) == [0]
    m = star.mixing_matrix("metropolis")
    assert m[0, 1] == pytest.approx(1 / 5) and m[1, 1] == pytest.approx(4 / 5)


def test_torus_is_near_square_with_four_neighbors():
    topo = Topology.from_name("torus", 12)            # 3 x 4
    assert topo.name == "torus(3x4)"
    assert all(topo.out_degree(r) == 4 for r in range(12))
    assert topo.out_neighbors(0) == [1, 3, 4, 8]
    assert Topology.from_name("torus", 16).out_neighbors(5) == [1, 4, 6, 9]


def test_random_graphs_reproducible_and_regular():
    a = Topology.from_name("random-regular:3", 10, seed=7)
    b = Topology.from_name("random-regular:3", 10, seed=7)
    assert a.edges() == b.edges()
    assert all(a.out_degree(r) == 3 for r in range(10))
    er = Topology.from_name("erdos-renyi:0.3", 12, seed=3)
    assert er.edges() == Topology.from_name("erdos-renyi:0.3", 12, seed=3).edges()
    assert er.is_connected()


def test_one_peer_exponential_rotates():
    topo = Topology.from_name("one-peer-exponential", 8)
    assert topo.period == 3 and topo.time_varying
    assert [topo.out_neighbors(2, step=s) for s in range(4)] == [[3], [4], [6], [3]]
    assert [topo.in_neighbors(2, step=s) for s in range(3)] == [[1], [0], [6]]
    assert topo.all_out_neighbors(2) == [3, 4, 6] and topo.all_in_neighbors(2) == [0, 1, 6]
    # product over one period of uniform matrices is exactly the average (classic property)
    prod = np.eye(8)
    for s in range(3):
        prod = topo.mixing_matrix("uniform", s) @ prod
    assert np.allclose(prod, 1 / 8)


def test_from_edges_directed_and_metropolis_refused():
    topo = Topology.from_edges(3, [(0, 1), (1, 2), (2, 0)], directed=True)
    assert topo.out_neighbors(0) == [1] and topo.in_neighbors(0) == [2]
    u = topo.mixing_matrix("uniform")
    assert np.allclose(u, [[0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5]])
    with pytest.raises(ValueError, match="undirected"):
        topo.mixing_matrix("metropolis")
    undirected = Topology.from_edges(3, [(0, 1), (1, 2)])
    assert undirected.in_neighbors(1) == [0, 2]


@pytest.mark.parametrize("call, match", [
    (lambda: Topology.from_edges(3, [(0, 3), (1, 2)]), "outside"),
    (lambda: Topology.from_edges(3, [(0, 0), (1, 2)]), "self-loop"),
    (lambda: Topology.from_edges(3, [(0, 1), (1, 0), (1, 2)]), "duplicate"),
    (lambda: Topology.from_edges(4, [(0, 1), (2, 3)]), "not connected"),
    (lambda: Topology.from_edges(3, [(0, 1), (1, 2)], directed=True), "strongly connected"),
    (lambda: Topology.from_name("ring", 0), "n >= 1"),
    (lambda: Topology.from_name("moebius", 4), "unknown topology"),
    (lambda: Topology.from_name("hypercube", 6), "power of two"),
    (lambda: Topology.from_name("erdos-renyi", 6), "probability"),
    (lambda: Topology.from_name("erdos-renyi:1.5", 6), "0 < P"),
    (lambda: Topology.from_name("random-regular:3", 5), "even"),
    (lambda: Topology.from_name("ring:3", 5), "no parameter"),
    (lambda: Topology.from_name("ring", 4).out_neighbors(4), "outside"),
    (lambda: Topology.from_name("ring", 4).mixing_matrix("laplace"), "unknown mixing"),
])
def test_bad_topologies_raise_one_line_value_errors(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
