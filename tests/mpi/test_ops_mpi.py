"""Horovod-shaped operations (hpc_dgrab.ops) against one-process references computed from every
rank's deterministic inputs; run under mpirun -n 2, 3 and 4.

Each test computes on every rank, gathers a verdict, and asserts on every rank (no assert before
an operation the others wait in). Mismatches must raise the same one-line error everywhere.
"""
import itertools
import json

import pytest
import torch

import hpc_dgrab as hd
from hpc_dgrab.ops.execute import scatter_counts


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _all_true(flag):
    return all(_world().allgather(bool(flag)))


@pytest.fixture(autouse=True)
def _init():
    hd.init()
    yield


def _inp(r, shape, dtype, small=False):
    """Rank r's input: small integers (exact in every dtype), different per rank."""
    n = max(1, int(torch.tensor(shape).prod().item())) if shape else 1
    base = torch.arange(n, dtype=torch.float64)
    vals = (base + r) % 2 + 1 if small else (base * (r + 1) + 3 * r) % 23 - 7
    return vals.reshape(shape).to(dtype)


def _reference(op, stack, dtype, size):
    if op == hd.Sum:
        out = stack.sum(0)
    elif op == hd.Average:
        out = stack.sum(0)
        out = torch.div(out, size, rounding_mode="trunc") if not dtype.is_floating_point else out / size
    elif op == hd.Min:
        out = stack.min(0).values
    elif op == hd.Max:
        out = stack.max(0).values
    else:
        out = stack.prod(0)
    return out.to(dtype)


DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64, torch.float16, torch.bfloat16]
OPS = [hd.Average, hd.Sum, hd.Min, hd.Max, hd.Product]
SHAPES = [(), (5,), (3, 4)]


@pytest.mark.mpi(min_size=2)
def test_allreduce_every_op_dtype_and_shape_matches_the_reference():
    n, r = hd.size(), hd.rank()
    bad = []
    for op, dtype, shape in itertools.product(OPS, DTYPES, SHAPES):
        small = op == hd.Product
        stack = torch.stack([_inp(q, shape, torch.float64, small) for q in range(n)])
        want = _reference(op, stack, dtype, n)
        got = hd.allreduce(_inp(r, shape, dtype, small), op=op)
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 0
        if got.dtype != dtype or got.shape != want.shape or \
                not torch.allclose(got.double(), want.double(), atol=tol, rtol=tol):
            bad.append((op, dtype, shape))
    # scale factors, in place, async in place
    x = _inp(r, (4,), torch.float64)
    total = sum(_inp(q, (4,), torch.float64) for q in range(n))
    scaled = hd.allreduce(x, op=hd.Sum, prescale_factor=2.0, postscale_factor=0.25)
    y = x.clone()
    same = hd.allreduce_(y, op=hd.Sum) is y
    z = x.clone()
    h = hd.allreduce_async_(z, op=hd.Average, name="inplace.async")
    done = hd.synchronize(h) is z
    ok = not bad and torch.equal(scaled, total * 0.5) and same and torch.equal(y, total) and done and \
        torch.allclose(z, total / n) and torch.equal(hd.allreduce(x, average=False), total)
    assert _all_true(ok), bad


@pytest.mark.mpi(min_size=2)
def test_grouped_allreduce_and_its_variants():
    n, r = hd.size(), hd.rank()
    xs = [_inp(r, (3,), torch.float64), _inp(r, (2, 2), torch.int64)]
    want = [sum(_inp(q, (3,), torch.float64) for q in range(n)),
            sum(_inp(q, (2, 2), torch.int64) for q in range(n))]
    out = hd.grouped_allreduce(xs, op=hd.Sum)
    copies = [x.clone() for x in xs]
    back = hd.grouped_allreduce_(copies, op=hd.Sum)
    h = hd.grouped_allreduce_async(xs, op=hd.Sum, name="grouped.async")
    asynced = hd.synchronize(h)
    ok = all(torch.equal(a, b) for a, b in zip(out, want)) and all(a is b for a, b in zip(back, copies))
    ok = ok and all(torch.equal(a, b) for a, b in zip(copies, want))
    ok = ok and all(torch.equal(a, b) for a, b in zip(asynced, want))
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_allgather_first_dimension_may_differ():
    n, r = hd.size(), hd.rank()
    ok = True
    for dtype in (torch.float32, torch.int64, torch.float16, torch.bool):
        mine = _inp(r, (r + 1, 3), torch.float64).to(dtype)
        want = torch.cat([_inp(q, (q + 1, 3), torch.float64).to(dtype) for q in range(n)])
        ok = ok and torch.equal(hd.allgather(mine), want)
    a, b = hd.grouped_allgather([torch.full((r,), float(r)), torch.tensor([r, r])])
    ok = ok and torch.equal(a, torch.cat([torch.full((q,), float(q)) for q in range(n)]))
    ok = ok and torch.equal(b, torch.tensor([q for q in range(n) for _ in range(2)]))
    ok = ok and torch.equal(hd.synchronize(hd.allgather_async(torch.tensor([r]))), torch.arange(n))
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_broadcast_from_every_root():
    n, r = hd.size(), hd.rank()
    ok = True
    for root in range(n):
        x = _inp(r, (2, 3), torch.float32)
        ok = ok and torch.equal(hd.broadcast(x, root), _inp(root, (2, 3), torch.float32))
        ok = ok and torch.equal(x, _inp(r, (2, 3), torch.float32))        # input unchanged
        y = x.clone()
        ok = ok and hd.broadcast_(y, root) is y and torch.equal(y, _inp(root, (2, 3), torch.float32))
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_alltoall_with_and_without_splits():
    n, r = hd.size(), hd.rank()

    def splits_of(q):      # rows rank q sends to each rank
        return [(j + q) % 3 for j in range(n)]

    def data_of(q):        # row value = 100 * sender + receiver
        return torch.cat([torch.full((k, 2), 100.0 * q + j) for j, k in enumerate(splits_of(q))])

    out, recv = hd.alltoall(data_of(r), splits=torch.tensor(splits_of(r), dtype=torch.int32))
    want = torch.cat([torch.full((splits_of(q)[r], 2), 100.0 * q + r) for q in range(n)])
    ok = torch.equal(out, want) and recv.tolist() == [splits_of(q)[r] for q in range(n)]
    even = hd.alltoall(torch.arange(2 * n) + 10 * r)             # equal parts, no splits returned
    ok = ok and torch.equal(even, torch.tensor([10 * q + 2 * r + i for q in range(n) for i in range(2)]))
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_reducescatter_uneven_rows_and_grouped():
    n, r = hd.size(), hd.rank()
    rows = 2 * n + 1
    xs = [_inp(q, (rows, 2), torch.float64) for q in range(n)]
    counts = scatter_counts(rows, n)
    start = sum(counts[:r])
    total = sum(xs)
    got = hd.reducescatter(xs[r], op=hd.Sum)
    avg = hd.reducescatter(xs[r])
    a, b = hd.grouped_reducescatter([xs[r], xs[r].to(torch.int64)], op=hd.Sum)
    want = total[start:start + counts[r]]
    ok = torch.equal(got, want) and torch.allclose(avg, want / n) and torch.equal(a, want) and \
        torch.equal(b, want.to(torch.int64)) and sum(counts) == rows
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_gradients_follow_horovod():
    n, r = hd.size(), hd.rank()
    x = torch.ones(3, requires_grad=True)
    hd.allreduce(x, op=hd.Sum).sum().backward()
    ok = torch.equal(x.grad, torch.full((3,), float(n)))          # sum over ranks of d(sum)/dx
    g = torch.ones(r + 1, 2, requires_grad=True)
    (hd.allgather(g) * 2).sum().backward()
    ok = ok and torch.equal(g.grad, torch.full((r + 1, 2), 2.0))  # Horovod: the averaged gradient, own rows
    b = torch.ones(2, requires_grad=True)
    hd.broadcast(b, 0).sum().backward()
    ok = ok and torch.equal(b.grad, torch.full((2,), 1.0 if r == 0 else 0.0))
    t = torch.arange(float(n), requires_grad=True)
    out = hd.alltoall(t)
    (out * (r + 1)).sum().backward()                              # row j of t went to rank j
    ok = ok and torch.equal(t.grad, torch.arange(1.0, n + 1))
    s = torch.ones(2 * n, requires_grad=True)
    hd.reducescatter(s, op=hd.Average).sum().backward()
    ok = ok and torch.equal(s.grad, torch.ones(2 * n))
    assert _all_true(ok)


def _errors(fn):
    """Every rank's error message from ``fn`` (None where it did not raise)."""
    try:
        fn()
        msg = None
    except RuntimeError as exc:
        msg = f"{type(exc).__name__}: {exc}"
    return _world().allgather(msg)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("case", ["shape", "dtype", "op", "root", "name", "kind"])
def test_a_mismatch_raises_the_same_one_line_error_on_every_rank(case):
    r = hd.rank()
    calls = {
        "shape": lambda: hd.allreduce(torch.ones(3 + (r == 1))),
        "dtype": lambda: hd.allreduce(torch.ones(3, dtype=torch.float32 if r != 1 else torch.int32)),
        "op": lambda: hd.allreduce(torch.ones(3), op=hd.Sum if r != 1 else hd.Max),
        "root": lambda: hd.broadcast(torch.ones(3), root_rank=0 if r != 1 else 1),
        "name": lambda: hd.allreduce(torch.ones(3), name=f"mine.{r}"),
        "kind": lambda: (hd.allreduce(torch.ones(3), name="k") if r != 1
                         else hd.allgather(torch.ones(3), name="k")),
    }
    messages = _errors(calls[case])
    first = messages[0]
    assert first is not None and first.startswith("OpMismatchError: hpc_dgrab:") and "\n" not in first
    assert all(m == first for m in messages), messages
    assert _all_true(torch.equal(hd.allreduce(torch.ones(2), op=hd.Sum), torch.full((2,), float(hd.size()))))


@pytest.mark.mpi(min_size=2)
def test_local_argument_errors_are_value_errors_on_the_rank_that_made_them():
    n, r = hd.size(), hd.rank()
    with pytest.raises(ValueError, match="splits"):
        hd.alltoall(torch.ones(n - 1), splits=torch.ones(n, dtype=torch.int32))
    with pytest.raises(ValueError, match="32-bit"):
        hd.alltoall(torch.ones(n), splits=torch.ones(n))
    with pytest.raises(ValueError, match="Adasum"):
        hd.allreduce(torch.ones(2), op=hd.Adasum)
    h = hd.allreduce_async(torch.ones(2), name="dup", op=hd.Sum)
    with pytest.raises(ValueError, match="duplicate"):
        hd.allreduce_async(torch.ones(2), name="dup")
    ok = torch.equal(hd.synchronize(h), torch.full((2,), float(n)))
    only0 = hd.add_process_set([0])
    if r != 0:
        with pytest.raises(ValueError, match="not in process set"):
            hd.allreduce(torch.ones(2), process_set=only0)
    else:
        ok = ok and torch.equal(hd.allreduce(torch.ones(2), process_set=only0), torch.ones(2))
    hd.remove_process_set(only0)
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_process_sets_restrict_operations_to_their_members():
    n, r = hd.size(), hd.rank()
    evens = hd.add_process_set([q for q in range(n) if q % 2 == 0])
    odds = hd.add_process_set(hd.ProcessSet([q for q in range(n) if q % 2 == 1]))
    mine = evens if r % 2 == 0 else odds
    others = odds if r % 2 == 0 else evens
    got = hd.allreduce(torch.tensor([float(r)]), op=hd.Sum, process_set=mine)
    gathered = hd.allgather(torch.tensor([r]), process_set=mine)
    root = mine.ranks[-1]
    bcast = hd.broadcast(torch.tensor([r]), root, process_set=mine)
    hd.barrier(process_set=mine)
    ok = got.item() == sum(mine.ranks) and gathered.tolist() == mine.ranks and bcast.item() == root
    ok = ok and mine.included() and not others.included() and mine.rank() == mine.ranks.index(r)
    ok = ok and mine.mpi_comm.size == mine.size() and others.mpi_comm is None and others.rank() == -1
    ok = ok and hd.global_process_set.ranks == list(range(n))
    with pytest.raises(ValueError, match="already exists"):
        hd.add_process_set(list(evens.ranks))
    ok = ok and hd.remove_process_set(evens) and hd.remove_process_set(odds)
    ok = ok and not hd.remove_process_set(odds) and not hd.remove_process_set(hd.global_process_set)
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_named_operations_submitted_in_different_orders_match_by_name():
    n, r = hd.size(), hd.rank()
    names = [f"op{i}" for i in range(4)]
    order = names if r % 2 == 0 else list(reversed(names))
    handles = {name: hd.allreduce_async(torch.tensor([float(int(name[2:]) * 10 + r)]), name=name,
                                        op=hd.Sum) for name in order}
    ok = True
    for name in names:
        i = int(name[2:])
        ok = ok and hd.synchronize(handles[name]).item() == sum(i * 10 + q for q in range(n))
    h = hd.allreduce_async(torch.ones(1), name="polled")
    while not hd.poll(h):
        pass
    ok = ok and hd.synchronize(h).item() == 1.0
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_join_contributes_zeros_and_returns_the_last_rank_to_join():
    n, r = hd.size(), hd.rank()
    ok = True
    for first in range(n):
        if r == first:
            last = hd.join()
        else:
            got = hd.allreduce(torch.tensor([6.0 * n]), name="joined.sum", op=hd.Average)
            ok = ok and got.item() == 6.0 * (n - 1)          # the joined rank added zeros
            last = hd.join()
        lasts = _world().allgather(last)
        ok = ok and len(set(lasts)) == 1 and lasts[0] != first
    hd.barrier()
    assert _all_true(ok)


@pytest.mark.mpi(min_size=2)
def test_timeline_records_every_operation_as_valid_json(tmp_path_factory):
    r = hd.rank()
    path = _world().bcast(str(tmp_path_factory.mktemp("tl") / "trace.json") if r == 0 else None)
    hd.start_timeline(path)
    hd.allreduce(torch.ones(8), name="tl.allreduce")
    hd.allgather(torch.ones(2), name="tl.allgather")
    hd.stop_timeline()
    mine = path if r == 0 else path.replace(".json", f".rank{r}.json")
    with open(mine) as f:
        doc = json.load(f)
    events = {e["name"]: e for e in doc["traceEvents"] if e.get("ph") == "X"}
    ok = set(events) == {"tl.allreduce", "tl.allgather"} and events["tl.allreduce"]["args"]["bytes"] == 32
    ok = ok and all(e["dur"] >= e["args"]["run_us"] >= 0 for e in events.values())
    assert _all_true(ok)
