"""The coordinator's table (hpc_dgrab.ops.negotiation): matching by name, mismatch messages, join,
stalls and shutdown, as pure logic."""
from hpc_dgrab.ops.negotiation import Request, Table, mismatch
from hpc_dgrab.ops.reduce_ops import Average, Sum


def req(rank, name, seq=1, kind="allreduce", shape=(3,), dtype="float32", members=(0, 1), ps=0, **kw):
    return Request(rank=rank, seq=seq, name=name, kind=kind, process_set=ps, members=members,
                   dtypes=(dtype,), shapes=(shape,), **kw)


def test_ready_only_when_every_member_submitted_and_in_order_of_readiness():
    t = Table(2)
    t.submit(req(0, "a", 1))
    t.submit(req(0, "b", 2))
    assert t.step() == []
    t.submit(req(1, "b", 1))
    t.submit(req(1, "a", 2))
    out = t.step()
    assert [r.key[1] for r in out] == ["a", "b"] and all(r.error is None for r in out)
    assert out[0].requests[1].seq == 2 and out[0].targets == (0, 1)
    assert t.pending == {}


def test_mismatch_messages_name_the_ranks_and_values():
    assert mismatch([req(0, "x"), req(1, "x")]) is None
    assert mismatch([req(0, "x"), req(1, "x", shape=(4,))]) == \
        "hpc_dgrab: mismatched shape in allreduce 'x': rank 0 has (3,), rank 1 has (4,)"
    assert "dtype" in mismatch([req(0, "x"), req(1, "x", dtype="int32")])
    assert "reduction op" in mismatch([req(0, "x", op=Sum), req(1, "x", op=Average)])
    assert "root rank" in mismatch([req(0, "x", kind="broadcast", root=0),
                                    req(1, "x", kind="broadcast", root=1)])
    assert "operation" in mismatch([req(0, "x"), req(1, "x", kind="allgather")])
    # allgather: first dimensions may differ, the rest may not
    assert mismatch([req(0, "g", kind="allgather", shape=(2, 3)),
                     req(1, "g", kind="allgather", shape=(5, 3))]) is None
    assert "after the first" in mismatch([req(0, "g", kind="allgather", shape=(2, 3)),
                                          req(1, "g", kind="allgather", shape=(2, 4))])


def test_a_mismatch_becomes_one_error_response_for_every_member():
    t = Table(3)
    for r in range(3):
        t.submit(req(r, "x", shape=(3 + (r == 2),), members=(0, 1, 2)))
    (resp,) = t.step()
    assert resp.error.startswith("hpc_dgrab: mismatched shape") and resp.targets == (0, 1, 2)


def test_process_set_ops_need_only_their_members():
    t = Table(3)
    t.submit(req(0, "x", members=(0, 2), ps=1))
    assert t.step() == []
    t.submit(req(2, "x", members=(0, 2), ps=1))
    (resp,) = t.step()
    assert resp.key == (1, "x") and resp.targets == (0, 2)


def test_stall_when_every_rank_waits_on_names_nobody_else_submitted():
    t = Table(2)
    t.submit(req(0, "a", 1))
    t.submit(req(1, "b", 1))
    t.wait(0, 1)
    assert t.step() == []          # rank 1 still runs: it may submit "a" later
    t.wait(1, 1)
    out = t.step()
    assert len(out) == 2 and out[0].error == out[1].error
    assert "rank 0 waits on 'a', rank 1 waits on 'b'" in out[0].error


def test_a_wait_on_a_finished_instance_of_a_name_is_not_a_stall():
    t = Table(2)
    t.submit(req(0, "a", 1))
    t.submit(req(1, "a", 1))
    t.wait(0, 1)
    assert len(t.step()) == 1      # "a" (seq 1) done; rank 0's notice is stale
    t.submit(req(1, "a", 2))       # the next "a" from rank 1 only
    t.wait(1, 2)
    assert t.step() == []


def test_join_fills_in_for_reductions_and_refuses_gathers():
    t = Table(3)
    t.submit(Request(rank=1, seq=1, name="j", kind="join", process_set=0, members=(0, 1, 2)))
    t.submit(req(0, "r", members=(0, 1, 2)))
    t.submit(req(2, "r", members=(0, 1, 2)))
    t.submit(req(0, "g", kind="allgather", members=(0, 1, 2)))
    t.submit(req(2, "g", kind="allgather", members=(0, 1, 2)))
    out = {r.key[1]: r for r in t.step()}
    assert out["r"].error is None and out["r"].joined == (1,)
    assert "join" in out["g"].error
    for r in (0, 2):
        t.submit(Request(rank=r, seq=9, name="j", kind="join", process_set=0, members=(0, 1, 2)))
    (done,) = t.step()
    assert done.kind == "join" and done.last_joined == 2 and t.joined == []


def test_shutdown_only_once_every_rank_asked():
    t = Table(2)
    t.request_shutdown(0)
    assert t.step() == []
    t.request_shutdown(1)
    (resp,) = t.step()
    assert resp.kind == "shutdown"
