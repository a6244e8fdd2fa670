"""What a resume accepts from a checkpoint (training.state.check_contents, _check_places, the
sorter's order) and the stop flag's handling of a second signal; in-process, no MPI."""
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpc_dgrab.errors import UserError
from hpc_dgrab.order import make_sorter
from hpc_dgrab.training.signals import StopFlag
from hpc_dgrab.training.state import _check_places, check_contents


def _opt():
    return torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)


def _state(**change):
    opt = _opt()
    state = {"own": [1, 20], "optimizer": {"state": [], "param_groups": [dict(opt.param_groups[0])]},
             "progress": {"loss_sum": 3.5, "elapsed_s": 1.0, "counters0": {"comm_bytes": 10.0}}}
    state.update(change)
    return state


def _group(**change):
    group = dict(_opt().param_groups[0])
    group.update(change)
    return {"state": [], "param_groups": [group]}


def test_a_sound_state_passes():
    check_contents(_state(), _opt())


@pytest.mark.parametrize("change, fragment", [
    ({"own": [1, -4]}, "'own' must be [epoch, step], two integers >= 0"),
    ({"own": [1.5, 2]}, "'own' must be"),
    ({"progress": {"loss_sum": float("nan"), "elapsed_s": 0.0, "counters0": {}}}, "'progress' must hold"),
    ({"optimizer": _group(lr="0.1")},
     "hyper-parameter 'lr' of group 0 must be a finite number >= 0, got '0.1'"),
    ({"optimizer": _group(momentum=-1.0)}, "'momentum' of group 0 must be a finite number >= 0"),
    ({"optimizer": _group(nesterov="yes")}, "'nesterov' of group 0 must be true or false"),
    ({"optimizer": {"state": [], "param_groups": []}},
     "its optimizer has 0 parameter groups, this run's has 1"),
])
def test_meaningless_contents_are_one_line(change, fragment):
    with pytest.raises(ValueError) as info:
        check_contents(_state(**change), _opt())
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_places_must_agree_in_a_synchronous_run():
    cfg = SimpleNamespace(checkpoint_dir="ck", sync="allreduce")
    _check_places(cfg, [(1, 20), (1, 20)], (1, 20))
    with pytest.raises(UserError, match=r"rank 0 is at epoch 2 step 20, rank 1 at epoch 2 step 7") as info:
        _check_places(cfg, [(1, 20), (1, 7)], (1, 7))
    assert info.value.collective
    with pytest.raises(UserError, match="the lowest rank place is epoch 2 step 20, the checkpoint is at "
                                        "epoch 1 step 0"):
        _check_places(cfg, [(1, 20), (1, 20)], (0, 0))
    _check_places(SimpleNamespace(checkpoint_dir="ck", sync="gossip"), [(1, 20), (1, 23)], (1, 20))


@pytest.mark.parametrize("order, fragment", [
    (np.array([0, 1, 2, 99]), "not a permutation of this rank's 4 examples"),
    (np.array([0, 1, 1, 2]), "not a permutation"),
    (np.array([0, 1, 2]), "not a permutation"),
])
def test_sorter_order_out_of_range_is_refused(order, fragment):
    sorter = make_sorter("rr", 4, seed=0)
    state = sorter.state_dict()
    sorter.load_state_dict(dict(state))
    with pytest.raises(ValueError, match=fragment):
        sorter.load_state_dict({**state, "order": order})
    with pytest.raises(ValueError, match="order epoch -1"):
        sorter.load_state_dict({**state, "epoch": -1})


def test_a_second_stop_signal_is_ignored():
    flag = StopFlag()
    old = {s: signal.getsignal(s) for s in StopFlag.SIGNALS}
    try:
        flag.install()
        flag._handler(signal.SIGUSR1, None)
        assert flag.signum == signal.SIGUSR1
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in StopFlag.SIGNALS)
        flag._handler(signal.SIGTERM, None)     # one already in flight: the first one stays
        assert flag.signum == signal.SIGUSR1
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@pytest.mark.parametrize("reorder", [{"front": [[0], [99]], "back": []}, {"front": [[1]], "back": [[1]]}])
def test_balancing_sorter_reorder_indices_are_checked(reorder):
    sorter = make_sorter("grab", 8, seed=0)
    state = sorter.state_dict()
    sorter.load_state_dict(dict(state))
    with pytest.raises(ValueError, match="reorder holds example indices repeated or outside 0..7"):
        sorter.load_state_dict({**state, "reorder": reorder})
