"""Example ordering: hand-checked PairBalance, permutations, D-GraB equivalences, herding, resume, units."""
import numpy as np
import pytest
import torch

from hpc_dgrab import checkpoint
from hpc_dgrab.models import build_model
from hpc_dgrab.order import make_sorter
from hpc_dgrab.order.balance import balance_sign, coordinated_pair_balance, herding_bound, pair_balance
from hpc_dgrab.order.base import SORTERS
from hpc_dgrab.order.units import check_units, unit_gradients
from hpc_dgrab.tensors import flat_grad
from tests.helpers import mean_balance

# Six examples with 2-d gradients, visited in the order 0 1 2 3 4 5.
HAND_G = np.array([[1, 0], [0, 1], [2, 1], [0, 0], [1, 1], [1, 3]], dtype=np.float64)
# Worked by hand (s starts at 0; eps = +1 iff <s, c> <= 0; "+" fills the front, "-" the back):
#   pair (0,1): c = g0-g1 = (1,-1);  <s,c> = 0       -> eps +1, s = (1,-1);   next[0]=0, next[5]=1
#   pair (2,3): c = g2-g3 = (2, 1);  <s,c> = 2-1 = 1 -> eps -1, s = (-1,-2);  next[1]=3, next[4]=2
#   pair (4,5): c = g4-g5 = (0,-2);  <s,c> = 4       -> eps -1, s = (-1, 0);  next[2]=5, next[3]=4
HAND_NEXT = [0, 3, 5, 4, 2, 1]
# With only examples 0..4 (odd m): after the first two pairs s = (-1,-2), front [0,3], back [1,2];
# example 4 alone: <s, g4> = -1-2 = -3 <= 0 -> "+", front [0,3,4] -> next = 0 3 4 | 2 1.
HAND_NEXT_ODD = [0, 3, 4, 2, 1]


def _drive(sorter, grads, batch, visit=None):
    """One epoch: feed ``grads[i]`` for the order's examples in batches; 1-rank payload = own."""
    order = sorter.epoch_order()
    visit = len(order) if visit is None else visit
    for lo in range(0, visit if sorter.needs_grads else 0, batch):
        idx = order[lo:min(lo + batch, visit)]
        payload = sorter.observe(torch.from_numpy(grads[idx]), [(int(i),) for i in idx])
        sorter.apply_payload(payload)
    sorter.end_epoch()
    return sorter.epoch_order().copy()


def _with_identity(sorter):
    sorter._order = np.arange(sorter.num_examples)
    return sorter


def test_pairbalance_hand_checked():
    nxt, s = pair_balance(HAND_G, np.arange(6))
    assert nxt.tolist() == HAND_NEXT
    assert s.tolist() == [-1.0, 0.0]
    for name, opts in [("pairbalance", {}), ("dgrab", {"mode": "parallel"}), ("dgrab", {"mode": "exact"})]:
        for batch in (2, 3, 6):  # 3: pairs straddle the steps (a pending unit carries over)
            sorter = _with_identity(make_sorter(name, 6, **opts))
            assert _drive(sorter, HAND_G, batch).tolist() == HAND_NEXT, (name, opts, batch)


def test_pairbalance_hand_checked_odd():
    nxt, _ = pair_balance(HAND_G[:5], np.arange(5))
    assert nxt.tolist() == HAND_NEXT_ODD
    for name in ("pairbalance", "dgrab"):
        sorter = _with_identity(make_sorter(name, 5))
        assert _drive(sorter, HAND_G[:5], 2).tolist() == HAND_NEXT_ODD


def test_grab_mean_bookkeeping_raw_gradients():
    rng = np.random.default_rng(3)
    g1, g2 = rng.normal(size=(9, 4)), rng.normal(size=(9, 4))
    sorter = make_sorter("grab", 9, seed=5)
    o1 = sorter.epoch_order().copy()
    ref1, mu1 = mean_balance(g1, o1, None)
    assert np.array_equal(_drive(sorter, g1, 4), ref1)
    assert np.allclose(sorter.stale_mean, g1.mean(0), atol=1e-14)  # the raw mean, not the centred one
    ref2, mu2 = mean_balance(g2, ref1, mu1)
    assert np.array_equal(_drive(sorter, g2, 3), ref2)
    assert np.allclose(sorter.stale_mean, g2.mean(0), atol=1e-14)


@pytest.mark.parametrize("name", SORTERS)
def test_every_epoch_is_a_permutation(name):
    rng = np.random.default_rng(0)
    m = 13
    for mode in (["parallel", "exact"] if name == "dgrab" else [None]):
        sorter = make_sorter(name, m, seed=1, rank=0, world_size=1, mode=mode)
        orders = [sorter.epoch_order().copy()]
        for epoch in range(4):
            g = rng.normal(size=(m, 3))
            # batch 4, 3 steps: example order[12] is never visited (it must stay in the middle)
            orders.append(_drive(sorter, g, 4, visit=12))
        for o in orders:
            assert sorted(o.tolist()) == list(range(m))
        assert len({tuple(o) for o in orders}) > 1


def test_unvisited_examples_keep_the_middle():
    sorter = _with_identity(make_sorter("pairbalance", 8))
    nxt = _drive(sorter, np.vstack([HAND_G[:4], np.zeros((4, 2))]), 2, visit=4)
    # pairs (0,1) +1 and (2,3) -1 as in the hand example; 4..7 unvisited, in order, in the middle
    assert nxt.tolist() == [0, 3, 4, 5, 6, 7, 2, 1]


@pytest.mark.parametrize("mode", ["parallel", "exact"])
def test_dgrab_on_one_rank_equals_pairbalance(mode):
    rng = np.random.default_rng(1)
    m = 21
    a = make_sorter("pairbalance", m, seed=4)
    b = make_sorter("dgrab", m, seed=4, mode=mode)
    for epoch in range(4):
        g = rng.normal(size=(m, 6))
        assert np.array_equal(_drive(a, g, 2), _drive(b, g, 2))


def test_parallel_on_one_rank_equals_exact():
    rng = np.random.default_rng(2)
    m = 30
    a = make_sorter("dgrab", m, seed=9, mode="parallel")
    b = make_sorter("dgrab", m, seed=9, mode="exact")
    for epoch in range(4):
        g = rng.normal(size=(m, 5))
        assert np.array_equal(_drive(a, g, 2), _drive(b, g, 2))
        assert [x.tolist() for x in a.last_epoch_signs] == [x[:, 0].tolist() for x in b.last_epoch_signs]


def _simulate(n, m, d, mode, batch, epochs, seed=0, payload="full"):
    """n D-GraB sorters in one process; payloads summed like the all-reduce. Returns orders per epoch."""
    rng = np.random.default_rng(seed)
    sorters = [make_sorter("dgrab", m, seed=seed, rank=j, world_size=n, mode=mode, payload=payload)
               for j in range(n)]
    history, grads = [], []
    for _ in range(epochs):
        g = [rng.normal(size=(m, d)) for _ in range(n)]
        grads.append(g)
        start = [s.epoch_order().copy() for s in sorters]
        for lo in range(0, m, batch):
            idx = [s.epoch_order()[lo:lo + batch] for s in sorters]
            pays = [s.observe(torch.from_numpy(g[j][idx[j]]), [(int(i),) for i in idx[j]])
                    for j, s in enumerate(sorters)]
            total = torch.stack(pays).sum(0)
            for s in sorters:
                s.apply_payload(total)
        for s in sorters:
            s.end_epoch()
        history.append((start, g, [s.epoch_order().copy() for s in sorters], sorters[0].last_epoch_signs))
    return history


@pytest.mark.parametrize("batch", [2, 4, 5])
def test_exact_sorters_equal_coordinated_simulation(batch):
    for start, g, orders, signs in _simulate(4, 11, 5, "exact", batch, 3):
        ref, ref_signs = coordinated_pair_balance(g, start, "exact")
        for o, r in zip(orders, ref):
            assert np.array_equal(o, r)
        assert np.array_equal(np.concatenate([s for s in signs if len(s)]), ref_signs)


def test_parallel_sorters_equal_parallel_simulation_with_one_pair_per_step():
    for start, g, orders, _ in _simulate(4, 10, 5, "parallel", 2, 3):
        ref, _ = coordinated_pair_balance(g, start, "parallel")
        for o, r in zip(orders, ref):
            assert np.array_equal(o, r)


def test_half_payload_sorters_equal_the_half_payload_simulation():
    for start, g, orders, _ in _simulate(4, 11, 5, "parallel", 2, 3, payload="half"):
        ref, _ = coordinated_pair_balance(g, start, "parallel-half")
        for o, r in zip(orders, ref):
            assert np.array_equal(o, r)


def test_send_block_loses_nothing():
    from hpc_dgrab.order.balance import payload_block, send_block

    rng = np.random.default_rng(8)
    d = 7
    assert [payload_block(d, 2, t) for t in range(3)] == [slice(0, 3), slice(3, 7), slice(0, 3)]
    residual = np.zeros(d, dtype=np.float32)
    for t in range(9):   # per step: the sent block put back into the residual = old residual + update
        update = rng.normal(size=d) * 10.0 ** rng.integers(-3, 4)
        want = residual + update.astype(np.float32)
        block = payload_block(d, 2, t)
        sent = send_block(residual, update.astype(np.float32), block)
        assert sent.dtype == np.float32 and residual[block].tolist() == [0.0] * sent.size
        back = residual.copy()
        back[block] = sent
        assert np.array_equal(back, want)
    # over many steps with exactly representable updates: everything sent + what waits = all updates
    updates = rng.integers(-50, 50, size=(20, d)).astype(np.float32) / 8
    residual, shared = np.zeros(d, dtype=np.float32), np.zeros(d, dtype=np.float32)
    for t, u in enumerate(updates):
        block = payload_block(d, 2, t)
        shared[block] += send_block(residual, u, block)
    assert np.array_equal(shared + residual, updates.sum(0))
    assert not residual[payload_block(d, 2, 19)].any()


def test_half_payload_option_checks_and_state():
    with pytest.raises(ValueError, match="payload half needs mode parallel"):
        make_sorter("dgrab", 6, mode="exact", payload="half")
    with pytest.raises(ValueError, match="unknown D-GraB payload"):
        make_sorter("dgrab", 6, payload="quarter")
    full = make_sorter("dgrab", 6).state_dict()
    del full["payload"]   # a checkpoint from before the option: it sent everything
    make_sorter("dgrab", 6).load_state_dict(full)
    with pytest.raises(ValueError, match="payload full, not half"):
        make_sorter("dgrab", 6, payload="half").load_state_dict(full)


def test_dgrab_digest_detects_ranks_whose_running_sums_differ():
    rng = np.random.default_rng(4)
    g = [rng.normal(size=(6, 3)) for _ in range(2)]
    sorters = [make_sorter("dgrab", 6, seed=0, rank=j, world_size=2) for j in range(2)]

    def step(lo):
        pays = [s.observe(torch.from_numpy(g[j][s.epoch_order()[lo:lo + 2]]),
                          [(int(i),) for i in s.epoch_order()[lo:lo + 2]]) for j, s in enumerate(sorters)]
        total = pays[0] + pays[1]
        for s in sorters:
            s.apply_payload(total)

    step(0)
    assert [s.diverged_steps for s in sorters] == [0, 0]
    sorters[1]._s[0] += 1e-12  # rank 1's running sum drifts by one rounding error
    step(2)
    assert [s.diverged_steps for s in sorters] == [1, 1]


def test_herding_exact_parallel_independent_rr():
    from benchmarks.herding import run

    res = run(workers=8, per_worker=60, dim=16, rounds=8, seed=0)
    final = {k: float(np.mean(v[-3:])) for k, v in res["bound"].items()}
    assert final["dgrab"] <= final["dgrab-parallel"] < final["pairbalance"] < final["rr"], final


def test_herding_bound_closed_form():
    v = [np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([[0.0, 2.0], [0.0, -2.0]])]
    o = [np.array([0, 1]), np.array([0, 1])]
    assert herding_bound(v, o) == 2.0  # after step 1: (1, 2); after step 2: (0, 0)
    assert herding_bound(v, o, per_step=False) == 2.0  # prefixes (1,0) (1,2) (0,2) (0,0)
    assert herding_bound(v, [np.array([1, 0]), np.array([0, 1])], per_step=False) == 2.0


def test_balance_sign_ties_are_reproducible():
    assert balance_sign(np.zeros(3), np.ones(3)) == 1  # <s, c> = 0 -> "+"
    s = np.array([1e16, 1.0, -1e16])
    c = np.ones(3)
    assert balance_sign(s, c) == -1  # exact <s, c> = 1 > 0, whatever the BLAS summation order says
    assert balance_sign(-s, c) == 1


@pytest.mark.parametrize("name", SORTERS + ("dgrab-half",))
def test_resume_continues_identically(name):
    opts = {"mode": "parallel", "payload": "half"} if name == "dgrab-half" else {"mode": "exact"}
    name = name.split("-")[0]
    rng = np.random.default_rng(7)
    m = 15
    grads = [rng.normal(size=(m, 4)) for _ in range(4)]
    a = make_sorter(name, m, seed=3, **opts)
    _drive(a, grads[0], 4)
    # half of epoch 2, then checkpoint (through the checkpoint files' tensors + JSON tree encoding)
    order = a.epoch_order()
    if a.needs_grads:
        idx = order[:6]
        a.apply_payload(a.observe(torch.from_numpy(grads[1][idx]), [(int(i),) for i in idx]))
    tensors, tree = checkpoint.encode(a.state_dict())
    b = make_sorter(name, m, seed=3, **opts)
    b.load_state_dict(checkpoint.decode({k: v.clone() for k, v in tensors.items()}, tree))
    for s in (a, b):
        if s.needs_grads:
            idx = s.epoch_order()[6:]
            s.apply_payload(s.observe(torch.from_numpy(grads[1][idx]), [(int(i),) for i in idx]))
        s.end_epoch()
    assert np.array_equal(a.epoch_order(), b.epoch_order())
    for g in grads[2:]:
        assert np.array_equal(_drive(a, g, 4), _drive(b, g, 4))


def test_load_state_dict_rejects_a_different_sorter():
    state = make_sorter("pairbalance", 5).state_dict()
    with pytest.raises(ValueError, match="pairbalance"):
        make_sorter("dgrab", 5).load_state_dict(state)
    with pytest.raises(ValueError, match="mode"):
        make_sorter("dgrab", 5, mode="exact").load_state_dict(make_sorter("dgrab", 5).state_dict())


def test_make_sorter_errors():
    with pytest.raises(ValueError, match="unknown order"):
        make_sorter("sorted", 5)
    with pytest.raises(ValueError, match="mode"):
        make_sorter("dgrab", 5, mode="hybrid")
    with pytest.raises(ValueError, match="microbatch"):
        make_sorter("grab", 5, units="microbatch:0")


# ------------------------------------------------------------------------ units (torch.func)

def _batch(shape, n=6, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + shape, generator=gen), torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("model_name,shape", [("logreg", (5,)), ("cnn", (1, 8, 8))])
def test_per_example_gradients_match_autograd(model_name, shape):
    model = build_model(model_name, shape, 3, seed=0)
    x, y = _batch(shape)
    loss, g, units, slices = unit_gradients(model, torch.nn.functional.cross_entropy, x, y, "example")
    assert units.shape[0] == 6 and len(slices) == 6
    for i in (0, 5):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        assert torch.allclose(units[i], flat_grad(model), atol=1e-6)
    model.zero_grad()
    batch_loss = torch.nn.functional.cross_entropy(model(x), y)
    batch_loss.backward()
    assert torch.allclose(g, flat_grad(model), atol=1e-6)  # the step gradient needs no second backward
    assert abs(float(loss) - float(batch_loss.detach())) < 1e-6


def test_logreg_closed_form_equals_torch_func():
    from hpc_dgrab.order.units import per_example_gradients

    model = build_model("logreg", (2, 3), 4, seed=0)
    x, y = _batch((2, 3), n=5, classes=4)
    closed = per_example_gradients(model, torch.nn.functional.cross_entropy, x, y)
    generic = per_example_gradients(model, lambda out, t: torch.nn.functional.cross_entropy(out, t), x, y)
    assert torch.allclose(closed[0], generic[0], atol=1e-6)
    assert torch.allclose(closed[1], generic[1], atol=1e-6)


def test_microbatch_units_and_batchnorm():
    model = build_model("cnn-bn", (1, 8, 8), 3, seed=0)
    with pytest.raises(ValueError, match="BatchNorm2d.*microbatch"):
        check_units(model, "example")
    x, y = _batch((1, 8, 8), n=7)
    loss, g, units, slices = unit_gradients(model, torch.nn.functional.cross_entropy, x, y, "microbatch:3")
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 6), (6, 7)]
    assert units.shape[0] == 3
    assert torch.allclose(g, (3 * units[0] + 3 * units[1] + units[2]) / 7, atol=1e-6)
    lin = build_model("logreg", (4,), 3, seed=0)  # no BatchNorm: micro-batch mean = autograd mean
    x, y = _batch((4,), n=6)
    _, _, units, _ = unit_gradients(lin, torch.nn.functional.cross_entropy, x, y, "microbatch:2")
    lin.zero_grad()
    torch.nn.functional.cross_entropy(lin(x[2:4]), y[2:4]).backward()
    assert torch.allclose(units[1], flat_grad(lin), atol=1e-6)


def test_sync_sgd_with_a_balancing_sorter_takes_the_plain_sgd_step():
    from hpc_dgrab.compress import GradientExchange
    from tests.helpers import FlatSync, transport

    x, y = _batch((5,), n=8)
    models = [build_model("logreg", (5,), 3, seed=1) for _ in range(2)]
    sorter = make_sorter("dgrab", 8, mode="parallel")
    for model, srt in zip(models, (None, sorter)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        driver = FlatSync(model, opt, torch.nn.functional.cross_entropy, GradientExchange(transport("self")))
        for lo in (0, 4):
            driver.step(x[lo:lo + 4], y[lo:lo + 4], sorter=srt, indices=np.arange(lo, lo + 4))
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.allclose(p, q, atol=1e-6)
    assert driver.order_bytes == 2 * (18 + 1) * 4  # two steps of d = 18 float32 + the digest
    sorter.end_epoch()
    assert sorted(sorter.epoch_order().tolist()) == list(range(8))


# ------------------------------------------------------------- ghost inner products (no d-vectors)

@pytest.mark.parametrize("model_name,shape", [("logreg", (5,)), ("mlp", (1, 6, 6)), ("cnn", (1, 8, 8))])
def test_ghost_units_equal_materialised_per_example_gradients(model_name, shape):
    from hpc_dgrab.order.ghost import DenseUnits, ghost_units
    from hpc_dgrab.order.units import per_example_gradients

    model = build_model(model_name, shape, 3, seed=0)
    x, y = _batch(shape, n=7)
    losses, dense = per_example_gradients(model, lambda o, t: torch.nn.functional.cross_entropy(o, t), x, y)
    got = ghost_units(model, torch.nn.functional.cross_entropy, x, y)
    assert got is not None
    ghost_losses, mean, gu = got
    du = DenseUnits(dense)
    rng = np.random.default_rng(0)
    v, w = rng.normal(size=(2, du.d)), rng.normal(size=(3, 7))
    scale = float(np.abs(du._g).max())
    for a, b in [(gu.dots(v), du.dots(v)), (gu.gram(), du.gram()), (gu.weighted_sum(w), du.weighted_sum(w)),
                 (gu.rows([0, 6]), du.rows([0, 6]))]:
        assert a.shape == b.shape
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5 * scale * max(1.0, np.abs(b).max() / scale))
    assert torch.allclose(mean, dense.mean(0), atol=1e-6)
    assert torch.allclose(ghost_losses, losses, atol=1e-6)


def test_ghost_falls_back_for_unsupported_layers():
    from hpc_dgrab.order.ghost import ghost_units
    from hpc_dgrab.order.units import step_units

    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    x, y = _batch((4,), n=6)
    assert ghost_units(model, torch.nn.functional.cross_entropy, x, y) is None
    loss, grad, units, _ = step_units(model, torch.nn.functional.cross_entropy, x, y)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert torch.allclose(grad, flat_grad(model), atol=1e-6)
    assert type(units).__name__ == "DenseUnits"
    shared = torch.nn.Linear(4, 4)  # one layer called twice: its per-call factors do not add up
    assert ghost_units(torch.nn.Sequential(shared, torch.nn.ReLU(), shared), torch.nn.functional.mse_loss,
                       x, torch.randn(6, 4)) is None


def test_herd_signs_equal_sequential_balance_sign():
    from hpc_dgrab.order.balance import herd_signs

    rng = np.random.default_rng(5)
    c = rng.normal(size=(9, 4))
    s0 = rng.normal(size=4)
    s, ref = s0.copy(), []
    for row in c:
        ref.append(balance_sign(s, row))
        s += ref[-1] * row
    assert herd_signs(c @ s0, c @ c.T).tolist() == ref
    assert herd_signs(np.zeros(2), np.zeros((2, 2))).tolist() == [1, 1]  # exact ties -> "+"


def test_ghost_sorters_take_the_same_signs_as_materialised_gradients():
    from benchmarks.order import sign_agreement

    for name, shape in [("mlp", (1, 6, 6)), ("cnn", (1, 8, 8))]:
        model = build_model(name, shape, 3, seed=1)
        x, y = _batch(shape, n=45, seed=2)
        res = sign_agreement(model, x, y, batch=6)
        assert res["pairs"] == 22 and res["mismatches"] == 0, res
        assert res["same_order"], res
