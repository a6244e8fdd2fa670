"""Horovod's cast compressors, the half-precision MPI sum's kernel, the op constants' checks and the
bucket plan of num_groups/groups (no MPI)."""
import pytest
import torch

import hpc_dgrab as hd
from hpc_dgrab.compress.cast import _adder
from hpc_dgrab.errors import UserError
from hpc_dgrab.optim.options import plan_groups
from hpc_dgrab.optim.options import check_gradient_op


def test_none_returns_its_input():
    t = torch.randn(5)
    wire, ctx = hd.Compression.none.compress(t)
    assert wire is t and hd.Compression.none.decompress(wire, ctx) is t


@pytest.mark.parametrize("name, dtype, rel", [("fp16", torch.float16, 2 ** -11),
                                              ("bf16", torch.bfloat16, 2 ** -8)])
def test_half_round_trip(name, dtype, rel):
    c = getattr(hd.Compression, name)
    t = torch.randn(1000, dtype=torch.float64)
    wire, ctx = c.compress(t)
    assert wire.dtype == dtype
    back = c.decompress(wire, ctx)
    assert back.dtype == torch.float64 and back.shape == t.shape
    assert torch.all(torch.abs(back - t) <= rel * torch.abs(t) + 1e-7)
    ints = torch.arange(4)
    w, ictx = c.compress(ints)
    assert w is ints and c.decompress(w, ictx) is ints   # non-floating tensors pass through


def test_sparse_aliases():
    assert hd.Compression.topk(0.1) == hd.TopK(0.1)
    assert hd.Compression.regtopk(0.05) == hd.RegTopK(0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_sum_kernel_adds_in_place(dtype):
    a = torch.tensor([1.5, -2.0, 3.25], dtype=dtype)
    b = torch.tensor([0.5, 4.0, -1.25], dtype=dtype)
    out = b.clone()
    _adder(dtype)(memoryview(a.view(torch.int16).numpy()), memoryview(out.view(torch.int16).numpy()), None)
    assert torch.equal(out, a + b)


def test_gradient_op_checks():
    check_gradient_op(hd.Average, 2.0)
    check_gradient_op(hd.Sum, 1.0)
    for op, f, match in [(hd.Adasum, 1.0, "Adasum"), (hd.Sum, 2.0, "only valid"),
                         ("max", 1.0, "hd.Average or hd.Sum"), (hd.Average, 0.0, "> 0")]:
        with pytest.raises(UserError, match=match):
            check_gradient_op(op, f)


def test_plan_groups():
    ps = [torch.zeros(3, requires_grad=True) for _ in range(5)]
    plan = plan_groups(ps, 2, None, 25)
    assert [len(g) for g in plan] == [2, 3] or [len(g) for g in plan] == [3, 2]
    assert plan[0][0] is ps[-1]                                     # backward order
    assert plan_groups(ps, 0, 5, 25) == [[p] for p in reversed(ps)]  # groups=int is num_groups
    mixed = ps[:2] + [torch.zeros(2, dtype=torch.float64, requires_grad=True)]
    assert all(len({p.dtype for p in g}) == 1 for g in plan_groups(mixed, 1, None, 25))
    given = plan_groups(ps, 0, [[ps[0], ps[4]]], 25)
    assert [ps[4], ps[0]] in given
    assert given[-1] == [ps[4], ps[0]]          # complete only when ps[0] (backward's last) is
    with pytest.raises(UserError, match="more than one group"):
        plan_groups(ps, 0, [[ps[0]], [ps[0]]], 25)
    with pytest.raises(UserError, match="share dtype"):
        plan_groups(mixed, 0, [mixed], 25)
