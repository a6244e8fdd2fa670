"""Serial tests: the straggler switch (parse, exact idle times with an injected clock), the staleness
meter, and end-to-end runs of the trainer with --sync gossip / --gradalign-beta under mpirun."""
import json

import pytest

from conftest import assert_one_line_error, run_cmd
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


TRAIN = ["-m", "hpc_dgrab.train", "--model", "mlp", "--lr", "0.05", "--batch-size", "16", "--seed", "1"]


def _metrics(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_train_gossip_with_straggler_end_to_end(digits_shards, tmp_path):
    out = tmp_path / "g.jsonl"
    proc = run_cmd(TRAIN + ["--data", digits_shards, "--epochs", "3", "--sync", "gossip", "--topology",
                            "one-peer-exponential", "--straggler", "1:3", "--metrics", str(out)],
                   ranks=4, timeout=240)
    assert proc.returncode == 0, proc.stderr
    recs = _metrics(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "val_acc", "epoch_time_s", "comm_bytes", "staleness_avg",
                "staleness_max", "messages", "replacements", "skipped_pushes"):
        assert key in recs[0]
    last = recs[-1]
    assert abs(sum(last["final_weight_ranks"]) - 4) < 1e-4      # push-sum mass after the drain
    assert last["avg_model_val_acc"] > 0.8 and min(last["own_model_val_acc_ranks"]) > 0.8
    assert last["straggler_idle_s_ranks"][1] > 0 and last["straggler_idle_s_ranks"][0] == 0
    assert recs[2]["train_loss"] < recs[0]["train_loss"]
    assert "average model" in proc.stdout


def test_train_gradalign_end_to_end(digits_shards, tmp_path):
    out = tmp_path / "ga.jsonl"
    proc = run_cmd(TRAIN + ["--data", digits_shards, "--epochs", "2", "--momentum", "0", "--gradalign-beta",
                            "0.02", "--local-steps", "3", "--metrics", str(out)], ranks=4, timeout=240)
    assert proc.returncode == 0, proc.stderr
    recs = _metrics(out)
    assert [r["local_steps"] for r in recs] == [3, 3] and recs[-1]["val_acc"] > 0.5
    # two all-reduces of (params + 1 count) float32 per round, from each of the 4 ranks (mlp on 8x8: 9610 params),
    # plus the trainer's control all-reduce (2 int32: stop, non-finite) per round
    assert recs[0]["comm_bytes"] == recs[0]["rounds"] * 4 * (2 * 4 * (9610 + 1) + 8)


def test_bad_straggler_and_combination_errors(digits_shards):
    proc = run_cmd(TRAIN + ["--data", digits_shards, "--epochs", "1", "--straggler", "9:3"], ranks=2, timeout=120)
    assert_one_line_error(proc, "--straggler", "out of range")
    proc = run_cmd(TRAIN + ["--data", digits_shards, "--epochs", "1", "--sync", "gossip", "--topology", "moebius"],
                   ranks=2, timeout=120)
    assert_one_line_error(proc, "--topology")
