"""Compression numerics: Top-k, RegTop-k, error feedback, SparseWorker, and GradientExchange on
one process (a 1-rank transport)."""
import math

import pytest
import torch

from hpc_dgrab.compress import (
    ErrorFeedback,
    GradientExchange,
    RegTopK,
    SparseWorker,
    TopK,
    k_for,
    make_compressor,
    regtopk_scores,
    topk_indices,
)
from hpc_dgrab.compress.selection import THRESHOLD_TOPK_MIN, _topk_by_threshold

D = torch.float64


def _sorted(t):
    return sorted(t.tolist())


def _self_transport():
    """A transport over this process alone (MPI.COMM_SELF)."""
    from mpi4py import MPI

    from hpc_dgrab.comm import get_transport

    return get_transport("mpi", MPI.COMM_SELF)


def _workers(method, n, d, k, mu=4.0, segment_sizes=None):
    return [SparseWorker(make_compressor(method, k=k, mu=mu), d, segment_sizes, dtype=D) for _ in range(n)]


def _round(workers, grads):
    """One round of ``len(workers)`` workers in one process: the mean of their selections, observed."""
    picks = [w.compress(g) for w, g in zip(workers, grads)]
    mean = torch.zeros(workers[0].numel, dtype=D)
    mean.index_add_(0, torch.cat([p[0] for p in picks]), torch.cat([p[1] for p in picks]))
    mean.div_(len(workers))
    for w in workers:
        w.observe(mean, len(workers))
    return mean


def _run(method, grads_per_round, k, mu=4.0, segment_sizes=None):
    """Simulate len(grads_per_round[0]) workers in one process; returns per-round selections and means."""
    workers = _workers(method, len(grads_per_round[0]), grads_per_round[0][0].numel(), k, mu, segment_sizes)
    sel, means = [], []
    for grads in grads_per_round:
        mean = _round(workers, grads)
        # a worker's selection = the zeros of its memory (random data has no others)
        sel.append([sorted(torch.nonzero(w.memory.error == 0).reshape(-1).tolist()) for w in workers])
        means.append(mean.clone())
    return sel, means, workers


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
    idx, val = TopK(k=3).compress(t, {})
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
        i1, v1 = TopK(k=k).compress(t, {})
        i2, v2 = RegTopK(k=k, mu=4.0).compress(t, {})
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
    w0, w1 = workers = _workers("regtopk", 2, 6, k=2, mu=1.0)
    mean1 = _round(workers, [t(3, -1, 2, 0.5, -4, 1), t(-3, 1, 0.5, 2, 1, -1)])
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

    mean2 = _round(workers, [t(2, 0.5, 0.5, 0.2, 0, 0.1), t(-2, 0.2, 0, 1, 0.5, 0.1)])
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
    ex_t = _workers("topk", 2, 6, k=2)
    _round(ex_t, [t(3, -1, 2, 0.5, -4, 1), t(-3, 1, 0.5, 2, 1, -1)])
    mean_t = _round(ex_t, [t(2, 0.5, 0.5, 0.2, 0, 0.1), t(-2, 0.2, 0, 1, 0.5, 0.1)])
    assert torch.allclose(mean_t, t(0, 0, 1.25, 0, 0.75, 0), atol=1e-15)


def test_regtopk_guards_zero_sent_value():
    """Fewer nonzeros than k: a zero is sent; next round its ratio is Q (weight 1), never nan/inf."""
    ex = GradientExchange(_self_transport(), RegTopK(k=3, mu=4.0), 4, dtype=D)
    ex.mean_(torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=D))
    st = ex.worker.states[0]
    assert (st["val"] == 0).sum() == 2
    score = regtopk_scores(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D), st, mu=4.0)
    assert torch.isfinite(score).all()
    # entry 0 was sent with 5 and came back as 5 (N = 1): weight tanh(1/4); the zeros: weight 1
    assert torch.allclose(score, torch.tensor([math.tanh(0.25), 2, 3, 4], dtype=D))


def test_per_tensor_segments_select_k_per_segment():
    g = torch.tensor([10.0, 9.0, 8.0, 0.1, 0.2, 0.3, 0.4, 0.5], dtype=D)
    w = SparseWorker(TopK(density=0.5), 8, segment_sizes=[2, 6], dtype=D)
    idx, val = w.compress(g)
    assert _sorted(idx) == [0, 2, 6, 7]            # 1 of the first 2, 3 of the last 6
    assert torch.equal(val, g[idx])
    flat = SparseWorker(TopK(density=0.5), 8, dtype=D)
    assert _sorted(flat.compress(g)[0]) == [0, 1, 2, 7]
    with pytest.raises(ValueError):
        SparseWorker(TopK(k=1), 8, segment_sizes=[3, 3])


def test_exchange_one_process_mean_extra_bytes_and_state_roundtrip():
    g = torch.Generator().manual_seed(3)
    tr = _self_transport()
    ex = GradientExchange(tr, RegTopK(density=0.1, mu=4.0), 100)
    grads = [torch.randn(100, generator=g) for _ in range(6)]
    for gr in grads[:3]:
        mean = gr.clone()
        extra = ex.mean_(mean, torch.tensor([1.0, 2.0]))
        assert torch.equal(extra, torch.tensor([1.0, 2.0]))
        assert torch.count_nonzero(mean) <= 10
    assert ex.bytes_sent == 3 * (10 * (4 + 4) + 2 * 4)   # int32 index + float32 value, plus extra
    state = ex.state_dict()
    assert state["method"] == "regtopk" and state["num_workers"] == 1 and state["rounds"] == 3
    clone = GradientExchange(tr, RegTopK(density=0.1, mu=4.0), 100)
    clone.load_state_dict(state)
    lazy = GradientExchange(tr, RegTopK(density=0.1, mu=4.0))     # sized by the state
    lazy.load_state_dict(state)
    assert lazy.worker.numel == 100
    for gr in grads[3:]:
        m1, m2, m3 = gr.clone(), gr.clone(), gr.clone()
        ex.mean_(m1)
        clone.mean_(m2)
        lazy.mean_(m3)
        assert torch.equal(m1, m2) and torch.equal(m1, m3)
    assert ex.bytes_sent == clone.bytes_sent == lazy.bytes_sent
    fresh = GradientExchange(tr, TopK(density=0.1))                # sized by the first gradient
    mean = grads[0].reshape(10, 10).clone()
    fresh.mean_(mean)
    assert mean.shape == (10, 10) and fresh.worker.numel == 100
    wrong = GradientExchange(tr, TopK(density=0.1), 100)
    with pytest.raises(ValueError):
        wrong.load_state_dict(state)


def test_dense_exchange_is_plain_mean():
    ex = GradientExchange(_self_transport(), None)
    mean = torch.tensor([1.0, 2, 3], dtype=D)
    extra = ex.mean_(mean, torch.tensor([3.0]))
    assert torch.equal(mean, torch.tensor([1.0, 2, 3], dtype=D)) and torch.equal(extra, torch.tensor([3.0]))
    assert ex.bytes_sent == 4 * 8
    assert torch.equal(ex.weighted_mean(torch.tensor([2.0, -4.0]), 3.0), torch.tensor([2.0, -4.0]))
    assert ex.bytes_sent == 4 * 8 + 3 * 4      # [n v | n] in one message
    with pytest.raises(ValueError):
        ex.weighted_mean(torch.tensor([2.0, -4.0]), 0.0)


def test_memory_shape_checked():
    m = ErrorFeedback(5)
    with pytest.raises(ValueError):
        m.compensate(torch.zeros(6))
    assert torch.equal(m.compensate([torch.ones(2), torch.ones(3)]), torch.ones(5))


def test_compressors_compare_hash_and_repr_by_parameters():
    assert TopK(0.01) == TopK(density=0.01) and hash(TopK(0.01)) == hash(TopK(density=0.01))
    assert RegTopK(density=0.01, mu=4.0) == RegTopK(0.01) != RegTopK(0.01, mu=5.0)
    assert TopK(0.01) != RegTopK(0.01) and repr(TopK(0.01)) == "TopK(density=0.01)"
    assert make_compressor("none") is None and make_compressor("topk", density=0.1) == TopK(0.1)


@pytest.mark.parametrize("mu", [4.0, 1e9])   # 1e9: tanh(Q / mu) < 1, every score is scaled
def test_scores_read_in_pieces_select_exactly_what_the_whole_vector_selects(mu):
    """Top-k and RegTop-k scan their scores a piece at a time (no d-sized score vector): the same
    numbers from at(), piece() and full(), and the same indices in the same order as selecting on
    the whole score tensor, also where last round's positions straddle piece boundaries."""
    from hpc_dgrab.compress.regtopk import RegTopKScores
    from hpc_dgrab.compress.selection import SCORE_PIECE, AbsScores

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
    comp = RegTopK(k=k, mu=mu)
    idx, val = comp.compress(a, state, ws)
    assert torch.equal(idx, topk_indices(regtopk_scores(a, state, mu), k)) and torch.equal(val, a[idx])


def test_pieces_act_like_the_concatenated_vector():
    """A flat vector kept as separate tensors (each parameter's gradient): scatter-sum with duplicate
    indices, gather, compensation and a whole exchange give the same bits as the one flat tensor."""
    from hpc_dgrab.compress.exchange import gather, scatter_sum_

    g = torch.Generator().manual_seed(4)
    shapes = [(3, 4), (5,), (1,), (2, 3, 2)]
    tensors = [torch.randn(*s, generator=g) for s in shapes]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    parts = [t.clone().reshape(-1) for t in tensors]
    idx = torch.randint(0, flat.numel(), (200,), generator=g)          # many duplicates
    val = torch.randn(200, generator=g)
    scatter_sum_(parts, idx, val)
    want = torch.zeros_like(flat).index_add_(0, idx, val)
    assert torch.equal(torch.cat(parts), want)
    assert torch.equal(gather(parts, idx), want[idx])
    e = torch.randn(flat.numel(), generator=g)
    m = ErrorFeedback(flat.numel())
    m.error = e.clone()
    assert torch.equal(m.compensate_(parts), e + want)
    grads = [torch.randn(flat.numel(), generator=g) for _ in range(3)]
    tr = _self_transport()
    for method in ("topk", "regtopk"):
        ref = GradientExchange(tr, make_compressor(method, k=4), flat.numel())
        got = GradientExchange(tr, make_compressor(method, k=4), flat.numel())
        for gr in grads:
            mean = gr.clone()
            ref.mean_(mean)
            p = [c.clone() for c in gr.split([6 * 2, 5, 1, 12])]
            got.mean_(p)
            assert torch.equal(torch.cat(p), mean)
        assert torch.equal(ref.worker.memory.error, got.worker.memory.error)
