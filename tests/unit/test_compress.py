"""Compression numerics without MPI: Top-k, RegTop-k, error feedback, the exchanger on one process."""
import math

import pytest
import torch

from hpc_dgrab.compress import (CompressedExchanger, ErrorFeedback, LocalCommunicator, RegTopKCompressor,
                                SparseWorker, TopKCompressor, k_for, make_compressor, make_exchanger,
                                regtopk_scores, topk_indices, worker_range)
from hpc_dgrab.compress.base import THRESHOLD_TOPK_MIN, _topk_by_threshold

D = torch.float64


def _sorted(t):
    return sorted(t.tolist())


def _run(method, grads_per_round, k, mu=4.0, segment_sizes=None):
    """Simulate len(grads_per_round[0]) workers in one process; returns per-round selections and means."""
    n = len(grads_per_round[0])
    d = grads_per_round[0][0].numel()
    ex = make_exchanger(method, d, n, LocalCommunicator(), local_workers=n, segment_sizes=segment_sizes,
                        dtype=D, k=k, mu=mu)
    sel, means = [], []
    for grads in grads_per_round:
        picks = []
        mean, _ = ex.exchange_many(grads)
        for w in ex.workers:  # a worker's selection = the zeros of its memory (random data has no others)
            picks.append(sorted(torch.nonzero(w.memory.error == 0).reshape(-1).tolist()))
        sel.append(picks)
        means.append(mean.clone())
    return sel, means, ex


def test_k_for_rounding_and_bounds():
    assert k_for(100, 0.6) == 60          # 0.6 * 100 = 60.000000000000001 must not become 61
    assert k_for(10, 0.001) == 1          # at least one entry
    assert k_for(10, k=50) == 10          # at most numel
    assert k_for(10 ** 7, 0.001) == 10 ** 4
    with pytest.raises(ValueError):
        make_compressor("topk", density=0)
    with pytest.raises(ValueError):
        make_compressor("regtopk", density=0.1, mu=0)
    with pytest.raises(ValueError):
        make_compressor("bogus", density=0.1)


def test_topk_selects_largest_magnitudes():
    t = torch.tensor([0.5, -3.0, 2.0, 0.1, -2.5, 1.0], dtype=D)
    idx, val, _ = TopKCompressor(k=3).compress(t, {})
    assert _sorted(idx) == [1, 2, 4]
    assert torch.equal(val, t[idx])


@pytest.mark.parametrize("case", ["normal", "heavy_tail", "zeros", "one_spike", "sample_misleads"])
def test_threshold_topk_selects_what_torch_topk_selects(case):
    n, k = THRESHOLD_TOPK_MIN + 12345, 3000
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(n, generator=g, dtype=torch.float32).abs_()
    if case == "heavy_tail":
        scores = scores.pow_(6)
    elif case == "zeros":                       # fewer nonzero entries than k: ties at zero
        scores[2000:] = 0
    elif case == "one_spike":
        scores[123] = 1e30
    elif case == "sample_misleads":             # large values exactly where the sample looks: fall back
        m = min(n // 4, max(4096, 256 * n // k))    # the sample the implementation draws
        looked = torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(0))
        scores[looked] += 10
        assert _topk_by_threshold(scores, k) is None
    idx = topk_indices(scores, k)
    ref = torch.topk(scores, k, sorted=False).indices
    assert idx.numel() == k and idx.unique().numel() == k
    assert torch.equal(scores[idx].sort().values, scores[ref].sort().values)   # the same values
    if case != "zeros":                         # no ties: the same positions
        assert torch.equal(idx.sort().values, ref.sort().values)
    assert torch.equal(topk_indices(scores, k), idx)                            # deterministic


def test_regtopk_round_one_equals_topk():
    g = torch.Generator().manual_seed(0)
    for d, k in [(1000, 10), (1000, 600), (7, 3)]:
        t = torch.randn(d, generator=g, dtype=D)
        i1, v1, _ = TopKCompressor(k=k).compress(t, {})
        i2, v2, _ = RegTopKCompressor(k=k, mu=4.0).compress(t, {})
        assert torch.equal(i1, i2) and torch.equal(v1, v2)


def test_error_feedback_a_equals_sent_plus_memory_every_round():
    g = torch.Generator().manual_seed(1)
    for method in ("topk", "regtopk"):
        comp = make_compressor(method, k=7, mu=2.0)
        worker = SparseWorker(comp, 50, dtype=D)
        for rnd in range(20):
            grad = torch.randn(50, generator=g, dtype=D)
            a = worker.memory.compensate(grad).clone()
            e_before = worker.memory.error.clone()
            assert torch.equal(a, grad + e_before)
            idx, val = worker.compress(grad)
            sent = torch.zeros(50, dtype=D)
            sent[idx] = val
            assert idx.numel() == 7 and len(set(idx.tolist())) == 7
            assert torch.equal(sent + worker.memory.error, a)           # exact, bit for bit
            assert torch.all(worker.memory.error[idx] == 0)
            worker.observe(torch.randn(50, generator=g, dtype=D), num_workers=3)


def test_regtopk_mu_to_zero_is_topk():
    """With mu -> 0 every weight tanh(|r|/mu) is 1 (r != 0): RegTop-k makes Top-k's choices every round."""
    g = torch.Generator().manual_seed(2)
    rounds = [[torch.randn(40, generator=g, dtype=D) + 0.3 * w for w in range(3)] for _ in range(25)]
    sel_t, means_t, _ = _run("topk", rounds, k=8)
    sel_r, means_r, _ = _run("regtopk", rounds, k=8, mu=1e-12)
    assert sel_t == sel_r
    for a, b in zip(means_t, means_r):
        assert torch.equal(a, b)
    # ... while a moderate mu does change the choices on the same data
    sel_r4, _, _ = _run("regtopk", rounds, k=8, mu=4.0)
    assert sel_r4[0] == sel_t[0] and sel_r4 != sel_t


def test_regtopk_hand_computed_two_workers_six_entries():
    """N = 2 workers, d = 6, k = 2, mu = 1 (Q = 1e8), worked by hand.

    Round 1 (memory 0, so a = g; no history -> plain Top-k):
      w0: a = [ 3, -1, 2, 0.5, -4, 1]  -> S = {4, 0}; v = [3,0,0,0,-4,0]; e = [0,-1,2,0.5,0,1]
      w1: a = [-3,  1, 0.5, 2,  1, -1] -> S = {0, 3}; v = [-3,0,0,2,0,0]; e = [0,1,0.5,0,1,-1]
      sum = [0,0,0,2,-4,0]; gbar = sum / 2 = [0, 0, 0, 1, -2, 0]
    Round 2 ratios r = N*gbar/v_prev on last round's S, Q elsewhere:
      w0: r[0] = 2*0/3 = 0 -> tanh(0) = 0;   r[4] = 2*(-2)/(-4) = 1 -> tanh(1) = 0.76159
      w1: r[0] = 2*0/(-3) = 0 -> 0;          r[3] = 2*1/2 = 1 -> 0.76159
      w0: g = [2, 0.5, 0.5, 0.2, 0, 0.1];  a = g + e = [2, -0.5, 2.5, 0.7, 0, 1.1]
          score = [0, 0.5, 2.5, 0.7, 0, 1.1] -> S = {2, 5} (Top-k would take {2, 0})
          v = [0,0,2.5,0,0,1.1]; e = [2,-0.5,0,0.7,0,0]
      w1: g = [-2, 0.2, 0, 1, 0.5, 0.1];   a = [-2, 1.2, 0.5, 1, 1.5, -0.9]
          score = [0, 1.2, 0.5, 0.76159, 1.5, 0.9] -> S = {4, 1} (Top-k would take {0, 4})
          v = [0,1.2,0,0,1.5,0]; e = [-2,0,0.5,1,0,-0.9]
      sum = [0, 1.2, 2.5, 0, 1.5, 1.1]; gbar = [0, 0.6, 1.25, 0, 0.75, 0.55]
    Round 3 ratios: w0 r[2] = 2*1.25/2.5 = 1, r[5] = 2*0.55/1.1 = 1; w1 r[1] = r[4] = 1.
    """
    t = lambda *x: torch.tensor(x, dtype=D)  # noqa: E731
    ex = make_exchanger("regtopk", 6, 2, LocalCommunicator(), local_workers=2, dtype=D, k=2, mu=1.0)
    w0, w1 = ex.workers
    mean1, _ = ex.exchange_many([t(3, -1, 2, 0.5, -4, 1), t(-3, 1, 0.5, 2, 1, -1)])
    assert torch.equal(mean1, t(0, 0, 0, 1, -2, 0))
    assert torch.equal(w0.memory.error, t(0, -1, 2, 0.5, 0, 1))
    assert torch.equal(w1.memory.error, t(0, 1, 0.5, 0, 1, -1))
    s0, s1 = w0.states[0], w1.states[0]
    assert _sorted(s0["idx"]) == [0, 4] and _sorted(s1["idx"]) == [0, 3]

    a0 = t(2, -0.5, 2.5, 0.7, 0, 1.1)
    score0 = regtopk_scores(t(2, 0.5, 0.5, 0.2, 0, 0.1) + w0.memory.error, s0, mu=1.0)
    assert torch.allclose(score0, t(0, 0.5, 2.5, 0.7, 0, 1.1), atol=1e-15)
    score1 = regtopk_scores(t(-2, 0.2, 0, 1, 0.5, 0.1) + w1.memory.error, s1, mu=1.0)
    assert torch.allclose(score1, t(0, 1.2, 0.5, math.tanh(1.0), 1.5, 0.9), atol=1e-15)

    mean2, _ = ex.exchange_many([t(2, 0.5, 0.5, 0.2, 0, 0.1), t(-2, 0.2, 0, 1, 0.5, 0.1)])
    assert _sorted(w0.states[0]["idx"]) == [2, 5] and _sorted(w1.states[0]["idx"]) == [1, 4]
    assert torch.allclose(mean2, t(0, 0.6, 1.25, 0, 0.75, 0.55), atol=1e-15)
    assert torch.allclose(w0.memory.error, t(2, -0.5, 0, 0.7, 0, 0), atol=1e-15)
    assert torch.allclose(w1.memory.error, t(-2, 0, 0.5, 1, 0, -0.9), atol=1e-15)
    assert torch.allclose(w0.memory.error + torch.zeros(6, dtype=D).index_put_((w0.states[0]["idx"],),
                                                                               w0.states[0]["val"]), a0)
    # round-3 ratios are all 1 -> weight tanh(1) on last round's positions
    score = regtopk_scores(torch.ones(6, dtype=D), w0.states[0], mu=1.0)
    assert torch.allclose(score, t(1, 1, math.tanh(1.0), 1, 1, math.tanh(1.0)), atol=1e-15)
    # Top-k on the same data takes {0, 2} and {0, 4} in round 2
    ex_t = make_exchanger("topk", 6, 2, LocalCommunicator(), local_workers=2, dtype=D, k=2)
    ex_t.exchange_many([t(3, -1, 2, 0.5, -4, 1), t(-3, 1, 0.5, 2, 1, -1)])
    mean_t, _ = ex_t.exchange_many([t(2, 0.5, 0.5, 0.2, 0, 0.1), t(-2, 0.2, 0, 1, 0.5, 0.1)])
    assert torch.allclose(mean_t, t(0, 0, 1.25, 0, 0.75, 0), atol=1e-15)


def test_regtopk_guards_zero_sent_value():
    """Fewer nonzeros than k: a zero is sent; next round its ratio is Q (weight 1), never nan/inf."""
    ex = make_exchanger("regtopk", 4, 1, LocalCommunicator(), dtype=D, k=3, mu=4.0)
    ex.exchange_many([torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=D)])
    st = ex.workers[0].states[0]
    assert (st["val"] == 0).sum() == 2
    score = regtopk_scores(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D), st, mu=4.0)
    assert torch.isfinite(score).all()
    # entry 0 was sent with 5 and came back as 5 (N = 1): weight tanh(1/4); the zeros: weight 1
    assert torch.allclose(score, torch.tensor([math.tanh(0.25), 2, 3, 4], dtype=D))


def test_per_tensor_segments_select_k_per_segment():
    g = torch.tensor([10.0, 9.0, 8.0, 0.1, 0.2, 0.3, 0.4, 0.5], dtype=D)
    w = SparseWorker(TopKCompressor(density=0.5), 8, segment_sizes=[2, 6], dtype=D)
    idx, val = w.compress(g)
    assert _sorted(idx) == [0, 2, 6, 7]            # 1 of the first 2, 3 of the last 6
    assert torch.equal(val, g[idx])
    flat = SparseWorker(TopKCompressor(density=0.5), 8, dtype=D)
    assert _sorted(flat.compress(g)[0]) == [0, 1, 2, 7]
    with pytest.raises(ValueError):
        SparseWorker(TopKCompressor(k=1), 8, segment_sizes=[3, 3])


def test_exchanger_one_process_mean_extra_bytes_and_state_roundtrip():
    g = torch.Generator().manual_seed(3)
    ex = make_exchanger("regtopk", 100, 1, LocalCommunicator(), density=0.1, mu=4.0)
    grads = [torch.randn(100, generator=g) for _ in range(6)]
    for gr in grads[:3]:
        mean, extra = ex.exchange(gr, torch.tensor([1.0, 2.0]))
        assert torch.equal(extra, torch.tensor([1.0, 2.0]))
        assert torch.count_nonzero(mean) <= 10
    assert ex.bytes_sent == 3 * (10 * (4 + 4) + 2 * 4)   # int32 index + float32 value, plus extra
    state = ex.state_dict()
    clone = make_exchanger("regtopk", 100, 1, LocalCommunicator(), density=0.1, mu=4.0)
    clone.load_state_dict(state)
    lazy = make_exchanger("regtopk", None, 1, LocalCommunicator(), density=0.1, mu=4.0)  # sized by the state
    lazy.load_state_dict(state)
    assert lazy.numel == 100
    for gr in grads[3:]:
        m1, _ = ex.exchange(gr)
        m2, _ = clone.exchange(gr)
        m3, _ = lazy.exchange(gr)
        assert torch.equal(m1, m2) and torch.equal(m1, m3)
    assert ex.bytes_sent == clone.bytes_sent == lazy.bytes_sent
    fresh = make_exchanger("topk", None, 1, LocalCommunicator(), density=0.1)   # sized by the first gradient
    mean, _ = fresh.exchange(grads[0].reshape(10, 10))
    assert mean.shape == (10, 10) and fresh.numel == 100
    wrong = make_exchanger("topk", 100, 1, LocalCommunicator(), density=0.1)
    with pytest.raises(ValueError):
        wrong.load_state_dict(state)


def test_dense_method_is_plain_mean():
    ex = make_exchanger("none", 3, 2, LocalCommunicator(), local_workers=2, dtype=D)
    mean, extra = ex.exchange_many([torch.tensor([1.0, 2, 3], dtype=D), torch.tensor([3.0, 2, 1], dtype=D)],
                                   [torch.tensor([1.0]), torch.tensor([2.0])])
    assert torch.equal(mean, torch.tensor([2.0, 2, 2], dtype=D)) and torch.equal(extra, torch.tensor([3.0]))
    assert ex.bytes_sent == 4 * 8


def test_worker_range_blocks():
    assert [list(worker_range(20, r, 3)) for r in range(3)] == [list(range(0, 6)), list(range(6, 13)),
                                                                 list(range(13, 20))]
    with pytest.raises(ValueError):
        worker_range(2, 0, 4)


def test_memory_shape_checked():
    m = ErrorFeedback(5)
    with pytest.raises(ValueError):
        m.compensate(torch.zeros(6))
    assert isinstance(CompressedExchanger, type)


@pytest.mark.parametrize("mu", [4.0, 1e9])   # 1e9: tanh(Q / mu) < 1, every score is scaled
def test_scores_read_in_pieces_select_exactly_what_the_whole_vector_selects(mu):
    """Top-k and RegTop-k scan their scores a piece at a time (no d-sized score vector): the same
    numbers from at(), piece() and full(), and the same indices in the same order as selecting on
    the whole score tensor, also where last round's positions straddle piece boundaries."""
    from hpc_dgrab.compress.base import SCORE_PIECE, AbsScores
    from hpc_dgrab.compress.regtopk import RegTopKScores

    n, k = 3 * SCORE_PIECE + 777, 5000
    g = torch.Generator().manual_seed(11)
    a = torch.randn(n, generator=g)
    last = torch.randperm(n, generator=g)[:k]
    last[:3] = torch.tensor([SCORE_PIECE - 1, SCORE_PIECE, n - 1])   # at the edges of pieces
    state = {"idx": last, "val": torch.randn(k, generator=g), "agg": torch.randn(k, generator=g)}
    state["val"][5] = 0.0                                              # the guard: ratio Q
    ws = torch.empty(SCORE_PIECE)
    for lazy, whole in ((AbsScores(a), a.abs()), (RegTopKScores(a, state, mu), regtopk_scores(a, state, mu))):
        assert torch.equal(lazy.full(), whole)
        pos = torch.randint(0, n, (5000,), generator=g)
        assert torch.equal(lazy.at(torch.cat([pos, last])), whole[torch.cat([pos, last])])
        lo, hi = SCORE_PIECE - 5, 2 * SCORE_PIECE - 5
        assert torch.equal(lazy.piece(lo, hi, ws), whole[lo:hi])
        assert torch.equal(topk_indices(lazy, k, ws), topk_indices(whole, k))
        assert torch.equal(_topk_by_threshold(lazy, k, ws), _topk_by_threshold(whole, k))
    comp = RegTopKCompressor(k=k, mu=mu)
    idx, val, _ = comp.compress(a, state, ws)
    assert torch.equal(idx, topk_indices(regtopk_scores(a, state, mu), k)) and torch.equal(val, a[idx])


def test_flat_parts_act_like_the_concatenated_vector():
    """FlatParts (a flat vector kept as separate tensors): scatter-add with duplicate indices, gather,
    compensation and a whole exchange give the same bits as the one flat tensor."""
    from hpc_dgrab.compress import FlatParts

    g = torch.Generator().manual_seed(4)
    shapes = [(3, 4), (5,), (1,), (2, 3, 2)]
    tensors = [torch.randn(*s, generator=g) for s in shapes]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    parts = FlatParts([t.clone() for t in tensors])
    idx = torch.randint(0, flat.numel(), (200,), generator=g)          # many duplicates
    val = torch.randn(200, generator=g)
    parts.zero_().index_add_(0, idx, val)
    want = torch.zeros_like(flat).index_add_(0, idx, val)
    assert torch.equal(torch.cat(parts.parts), want) and parts.numel() == flat.numel()
    assert torch.equal(parts[idx], want[idx]) and parts[:] is parts
    e = torch.randn(flat.numel(), generator=g)
    assert torch.equal(parts.add_to_(e.clone()), e + want)
    grads = [torch.randn(flat.numel(), generator=g) for _ in range(3)]
    for method in ("topk", "regtopk"):
        ref = make_exchanger(method, flat.numel(), 1, LocalCommunicator(), k=4)
        got = make_exchanger(method, flat.numel(), 1, LocalCommunicator(), k=4)
        for gr in grads:
            mean, _ = ref.exchange(gr.clone())
            p = FlatParts([c.clone() for c in gr.split([6 * 2, 5, 1, 12])])
            out, _ = got.exchange_parts(p, None)
            assert out is p and torch.equal(torch.cat(p.parts), mean)
        assert torch.equal(ref.workers[0].memory.error, got.workers[0].memory.error)
