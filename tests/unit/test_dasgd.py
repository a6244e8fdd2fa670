"""Serial tests: the straggler switch (parse, exact idle times with an injected clock) and the staleness
meter (the end-to-end runs are in tests/system/test_dasgd_cli.py)."""
import pytest

from hpc_dgrab.optim.dasgd import StalenessMeter
from hpc_dgrab.optim.straggler import Straggler, StragglerSpec, parse_straggler


def test_parse_straggler():
    assert parse_straggler("2:3", 4) == StragglerSpec(2, 3.0, "sleep")
    assert parse_straggler("0:1.5:spin") == StragglerSpec(0, 1.5, "spin")
    for bad, frag in (("3", "RANK:FACTOR"), ("a:2", "integer"), ("1:0.5", ">= 1"), ("1:nan", ">= 1"),
                      ("4:2", "out of range"), ("-1:2", "out of range"), ("1:2:nap", "sleep or spin")):
        with pytest.raises(ValueError, match=frag):
            parse_straggler(bad, 4)


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.slept = []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.slept.append(s)
        self.t += s


def test_straggler_idles_factor_minus_one_times_compute_excluding_comm():
    clock = FakeClock()
    s = Straggler(3.0, clock=clock, sleep=clock.sleep)
    s.begin()
    clock.t += 0.010              # 10 ms of compute
    assert s.end() == pytest.approx(0.020)
    s.begin()
    clock.t += 0.050              # 50 ms, of which 30 ms were communication
    s.add_comm(0.010)
    assert s.end(comm_seconds=0.020) == pytest.approx(0.040)
    assert clock.slept == pytest.approx([0.020, 0.040])
    assert s.idle_s == pytest.approx(0.060) and s.steps == 2
    clock.slept.clear()
    s.begin()                     # opened early (before loading the batch) ...
    clock.t += 0.005
    s.begin()                     # ... a second begin() inside the driver does not move it
    clock.t += 0.005
    assert s.end() == pytest.approx(0.020)   # 2 x (5 + 5) ms
    noop = Straggler.for_rank(StragglerSpec(1, 3.0), rank=0)
    assert not noop.active and noop.end() == 0.0


def test_straggler_spin_keeps_the_clock_running():
    clock = FakeClock()
    ticks = iter(range(10 ** 6))

    def advancing():  # every read of the clock advances 1 ms: the spin loop terminates
        clock.t = next(ticks) * 1e-3
        return clock.t

    s = Straggler(2.0, mode="spin", clock=advancing, sleep=clock.sleep)
    s.idle(0.005)
    assert clock.slept == [] and clock.t >= 0.005


def test_staleness_meter():
    m = StalenessMeter()
    for s in (0, 3, -2, 5):
        m.add(s)
    assert (m.count, m.total, m.max) == (4, 8, 5) and m.avg == 2.0
