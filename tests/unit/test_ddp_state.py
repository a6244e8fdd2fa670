"""hpc_dgrab.ddp's hook states on one process, without a process group: the settings' validation,
the per-bucket memory and its layout check, and the pickle / torch.save round trip."""
import threading

import pytest
import torch

import hpc_dgrab.ddp as hdd
from hpc_dgrab.errors import UserError
from tests.helpers import pickle_roundtrip

LAYOUT = ((4, 5), (5,), (3,))          # a bucket of three parameters: 20 + 5 + 3 entries


@pytest.mark.parametrize("make", [hdd.TopKState, hdd.RegTopKState])
@pytest.mark.parametrize("density", [0, 0.0, -0.5, 1.0001, 2, float("nan"), float("inf"), "0.1", None, True])
def test_a_density_outside_zero_one_is_a_one_line_user_error(make, density):
    with pytest.raises(UserError, match="density must be a number in") as err:
        make(density=density)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("start_iter", [0, 1, -3, 2.5, "2", True])
def test_start_iter_before_the_bucket_rebuild_is_refused(start_iter):
    with pytest.raises(UserError, match="start_iter must be an integer >= 2") as err:
        hdd.TopKState(density=0.1, start_iter=start_iter)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mu", [0, -1.0, float("nan"), "4"])
def test_regtopk_mu_must_be_positive(mu):
    with pytest.raises(UserError, match="mu must be a number > 0"):
        hdd.RegTopKState(density=0.1, mu=mu)


def test_valid_settings_and_their_compressors():
    top = hdd.TopKState(density=1, start_iter=5)
    reg = hdd.RegTopKState(density=0.25, mu=2)
    assert (top.density, top.start_iter, top.iter, top.process_group) == (1.0, 5, 0, None)
    assert (reg.density, reg.start_iter, reg.mu) == (0.25, hdd.MIN_START_ITER, 2.0)
    assert type(top.make_compressor()).__name__ == "TopK"
    assert reg.make_compressor().params()["mu"] == 2.0
    assert repr(reg) == "RegTopKState(density=0.25, start_iter=2, iter=0, mu=2.0)"
    assert not hasattr(top, "__dict__")                    # slots only


def _round(state, grad):
    """One compressed round of bucket 0 on one worker (the mean is this worker's own values)."""
    w = state.worker(0, grad, LAYOUT)
    idx, val = w.compress(grad)
    mean = torch.zeros_like(grad).index_add_(0, idx, val)
    w.observe(mean, 1)
    return idx, val


def test_memory_is_kept_per_bucket_and_a_different_layout_is_not_given_it():
    state = hdd.RegTopKState(density=0.25)
    grad = torch.randn(28, generator=torch.Generator().manual_seed(0))
    _round(state, grad)
    memory = state.workers[0].memory.error.clone()
    assert float(memory.abs().max()) > 0 and state.layouts == {0: LAYOUT}
    assert state.worker(0, grad, ((5,), (4, 5), (3,))) is None       # same size, other order
    assert state.worker(0, torch.zeros(30), LAYOUT + ((2,),)) is None  # other size
    assert torch.equal(state.workers[0].memory.error, memory)
    assert state.worker(1, torch.zeros(7), ((7,),)) is not state.workers[0]




@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("make", [hdd.TopKState, lambda **kw: hdd.RegTopKState(mu=0.5, **kw)])
def test_a_reloaded_state_continues_like_the_original(make, how):
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(28, generator=gen) for _ in range(6)]
    state = make(density=0.2, start_iter=3)
    for g in grads[:3]:
        _round(state, g)
    state.iter, state.bytes_sent = 7, 1234
    state.process_group = threading.Lock()                 # not picklable: must be dropped
    loaded = pickle_roundtrip(state, how)
    assert loaded.process_group is None
    assert (loaded.iter, loaded.bytes_sent, loaded.start_iter) == (7, 1234, 3)
    assert loaded.layouts == state.layouts and type(loaded) is type(state)
    assert getattr(loaded, "mu", None) == getattr(state, "mu", None)
    assert torch.equal(loaded.workers[0].memory.error, state.workers[0].memory.error)
    for g in grads[3:]:
        a, b = _round(state, g.clone()), _round(loaded, g.clone())
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(loaded.workers[0].memory.error, state.workers[0].memory.error)


def test_register_refuses_a_hook_of_the_other_state():
    with pytest.raises(UserError, match="regtopk_hook needs a hpc_dgrab.ddp.RegTopKState"):
        hdd.register(None, hdd.TopKState(density=0.1), hdd.regtopk_hook)
    with pytest.raises(UserError, match="state must be a TopKState or RegTopKState"):
        hdd.register(None, object())                        # type: ignore[arg-type]
