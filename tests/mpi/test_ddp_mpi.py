"""hpc_dgrab.ddp's communication hooks in torch's DistributedDataParallel over gloo (mpirun -n 2, -n 4):
the ranks stay bit-identical, ``regtopk_hook`` equals ``DistributedOptimizer(compression=RegTopK)``,
a pickled state continues the run identically, and the misuse errors.

The default process group is made from the MPI world by a gloo transport (hpc_dgrab's own
rendezvous); every test closes it at its end, on every rank in the same order (a gloo group must be
destroyed while the interpreter is whole, pytorch#56297). Every rank computes, the outcomes are
gathered, and every rank asserts after the last collective.
"""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_wrapper
from torch.nn.parallel import DistributedDataParallel as DDP

import hpc_dgrab.ddp as hdd
from hpc_dgrab.comm import get_transport
from hpc_dgrab.errors import UserError
from tests.helpers import pickle_roundtrip

STEPS = 6
START = 2


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _all_true(flag):
    return all(_world().allgather(bool(flag)))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(steps=STEPS):
    gen = torch.Generator().manual_seed(100 + _world().rank)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(steps)]


def _step(model, opt, batch):
    x, y = batch
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _group():
    """The default gloo group, made from the MPI world (closing the transport destroys it)."""
    return get_transport("gloo", _world())


# ------------------------------------------------------------------ the ranks agree
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["topk", "regtopk", "fp16-regtopk"])
def test_each_hook_keeps_the_ranks_bit_identical(kind):
    t = _group()
    model = _model()
    start = _flat(model)
    ddp = DDP(model, bucket_cap_mb=1e-3)                   # several buckets, each with its memory
    if kind == "topk":
        state, hook = hdd.TopKState(density=0.1, start_iter=START), hdd.topk_hook
    else:
        state, hook = hdd.RegTopKState(density=0.1, start_iter=START, mu=2.0), hdd.regtopk_hook
    if kind.startswith("fp16"):
        hook = fp16_compress_wrapper(hook)
    ddp.register_comm_hook(state, hook)
    opt = _sgd(ddp)
    for batch in _batches():
        _step(ddp, opt, batch)
    final = _flat(model)
    same = _world().allgather(final.numpy().tobytes())
    dtypes = {w.memory.error.dtype for w in state.workers.values()}
    t.close()
    ok = len(set(same)) == 1 and float((final - start).abs().max()) > 1e-3 and state.iter == STEPS
    ok = ok and len(state.workers) > 1 and state.bytes_sent > 0
    ok = ok and dtypes == {torch.float32}                  # fp16 on the wire only
    assert _all_true(ok), (kind, state, dtypes)


# ------------------------------------------------------------------ equals DistributedOptimizer
@pytest.mark.mpi(min_size=2)
def test_regtopk_hook_equals_the_distributed_optimizer_with_regtopk():
    import hpc_dgrab as hd

    comm = _world()
    hd.init(comm)
    t = _group()
    batches = _batches()
    model = _model()
    ddp = DDP(model, bucket_cap_mb=100)                    # one bucket: the selection is over everything
    state = hdd.RegTopKState(density=0.1, start_iter=START, mu=4.0)
    ddp.register_comm_hook(state, hdd.regtopk_hook)
    opt = _sgd(ddp)
    for batch in batches[:START]:                          # plain all-reduce: the common start
        _step(ddp, opt, batch)
    at_start, opt_at_start = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for batch in batches[START:]:
        _step(ddp, opt, batch)
    by_hook = _flat(model)

    other = _model(seed=1)
    other.load_state_dict(at_start)
    inner = _sgd(other)
    inner.load_state_dict(opt_at_start)
    dopt = hd.DistributedOptimizer(inner, other.named_parameters(), compression=hd.RegTopK(0.1, mu=4.0))
    for batch in batches[START:]:
        _step(other, dopt, batch)
    by_optimizer = _flat(other)
    start = torch.cat([v.reshape(-1) for v in at_start.values()])
    gap = float((by_hook - by_optimizer).abs().max())
    moved = float((by_hook - start).abs().max())
    buckets = len(state.workers)
    t.close()
    hd.shutdown()
    hd.init(comm)
    assert _all_true(gap <= 1e-6 and moved > 1e-3 and buckets == 1), (gap, moved, buckets)


# ------------------------------------------------------------------ checkpoint


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_state_saved_mid_run_continues_identically(how):
    """find_unused_parameters=True: DDP keeps its first bucket layout, so the new model's buckets are
    laid out as the memory is from its first iteration on."""
    t = _group()
    batches = _batches()
    cut = START + 2                                        # compression has run: the memory is not empty

    model = _model()
    ddp = DDP(model, bucket_cap_mb=100, find_unused_parameters=True)
    ddp.register_comm_hook(hdd.RegTopKState(density=0.1, start_iter=START), hdd.regtopk_hook)
    opt = _sgd(ddp)
    for batch in batches:
        _step(ddp, opt, batch)
    straight = _flat(model)

    model = _model()
    ddp = DDP(model, bucket_cap_mb=100, find_unused_parameters=True)
    state = hdd.RegTopKState(density=0.1, start_iter=START)
    ddp.register_comm_hook(state, hdd.regtopk_hook)
    opt = _sgd(ddp)
    for batch in batches[:cut]:
        _step(ddp, opt, batch)
    saved = pickle_roundtrip(state, how)
    weights, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    memory_kept = saved.iter == cut and saved.process_group is None and len(saved.workers) == 1 \
        and torch.equal(saved.workers[0].memory.error, state.workers[0].memory.error) \
        and float(saved.workers[0].memory.error.abs().max()) > 0
    del ddp, opt

    resumed = _model(seed=1)                               # a new process would start like this
    resumed.load_state_dict(weights)
    ddp = DDP(resumed, bucket_cap_mb=100, find_unused_parameters=True)
    ddp.register_comm_hook(saved, hdd.regtopk_hook)
    opt = _sgd(ddp)
    opt.load_state_dict(opt_state)
    for batch in batches[cut:]:
        _step(ddp, opt, batch)
    again = _flat(resumed)
    t.close()
    assert _all_true(memory_kept and torch.equal(straight, again)), float((straight - again).abs().max())


@pytest.mark.mpi(min_size=2)
def test_a_state_loaded_into_a_model_that_rebuilds_its_buckets_keeps_its_memory_for_them():
    """Default DDP: the new model's first iteration runs on its initial buckets; where they are laid
    out otherwise than the memory, that iteration is a plain all-reduce and the memory waits."""
    t = _group()
    batches = _batches(STEPS + 2)
    cut = START + 2
    model = _model()
    ddp = DDP(model, bucket_cap_mb=100)
    state = hdd.RegTopKState(density=0.1, start_iter=START)
    ddp.register_comm_hook(state, hdd.regtopk_hook)
    opt = _sgd(ddp)
    for batch in batches[:cut]:
        _step(ddp, opt, batch)
    saved = pickle.loads(pickle.dumps(state))
    memory, layout = saved.workers[0].memory.error.clone(), saved.layouts[0]
    resumed = _model(seed=1)
    resumed.load_state_dict(model.state_dict())
    ddp = DDP(resumed, bucket_cap_mb=100)
    ddp.register_comm_hook(saved, hdd.regtopk_hook)
    opt2 = _sgd(ddp)
    opt2.load_state_dict(opt.state_dict())
    _step(ddp, opt2, batches[cut])
    waited = torch.equal(saved.workers[0].memory.error, memory)
    for batch in batches[cut + 1:]:
        _step(ddp, opt2, batch)
    final = _flat(resumed)
    same = _world().allgather(final.numpy().tobytes())
    used_later = not torch.equal(saved.workers[0].memory.error, memory)
    t.close()
    ok = waited and used_later and saved.layouts == {0: layout} and len(set(same)) == 1
    assert _all_true(ok and saved.iter == STEPS + 2), (waited, used_later)


# ------------------------------------------------------------------ misuse
@pytest.mark.mpi(min_size=2)
def test_misuse_is_a_one_line_error():
    t = _group()
    outcomes = []
    for bad in (0.0, -0.1, 1.5, float("nan")):
        for make in (hdd.TopKState, hdd.RegTopKState):
            try:
                make(density=bad)
                outcomes.append(False)
            except UserError as exc:
                outcomes.append("density" in str(exc) and "\n" not in str(exc))
    ddp = DDP(_model(), bucket_cap_mb=100)
    hdd.register(ddp, hdd.RegTopKState(density=0.1))
    for again in (lambda m: hdd.register(m, hdd.TopKState(density=0.1)),
                  lambda m: hdd.register(m, hdd.RegTopKState(density=0.1), hdd.regtopk_hook)):
        try:
            again(ddp)
            outcomes.append(False)
        except UserError as exc:
            outcomes.append("already has a communication hook" in str(exc) and "\n" not in str(exc))
    other = DDP(_model(), bucket_cap_mb=100)
    other.register_comm_hook(hdd.TopKState(density=0.1), hdd.topk_hook)
    try:                                                   # torch's own refusal, as registered directly
        other.register_comm_hook(hdd.TopKState(density=0.1), hdd.topk_hook)
        outcomes.append(False)
    except RuntimeError as exc:
        outcomes.append("once" in str(exc) and "\n" not in str(exc))
    try:
        hdd.register(DDP(_model(), bucket_cap_mb=100), hdd.TopKState(density=0.1), hdd.regtopk_hook)
        outcomes.append(False)
    except UserError as exc:                               # a state of the other hook
        outcomes.append("needs a hpc_dgrab.ddp.RegTopKState" in str(exc))
    del ddp, other
    t.close()
    assert _all_true(all(outcomes)), outcomes
